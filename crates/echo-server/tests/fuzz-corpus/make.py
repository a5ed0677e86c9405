#!/usr/bin/env python3
"""Writes the seed corpus of tests/fuzz.rs: whole client conversations,
each a file of the bytes a client sends. The fuzzer mutates these (and
splices them together); inputs that once hurt the server are added here by
hand, named after what they found.

    python3 crates/echo-server/tests/fuzz-corpus/make.py
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s(b):
    if isinstance(b, str):
        b = b.encode()
    return struct.pack(">H", len(b)) + b


def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


def props(*items):
    body = b"".join(items)
    return varint(len(body)) + body


def connect(level, cid, flags=0x02, keep_alive=30, properties=b"", tail=b""):
    body = s("MQTT") + bytes([level, flags]) + struct.pack(">H", keep_alive)
    if level == 5:
        body += props(properties)
    return packet(0x10, body + s(cid) + tail)


def publish(level, topic, payload, qos=0, pkid=1, retain=False, properties=b""):
    body = s(topic) + (struct.pack(">H", pkid) if qos else b"")
    if level == 5:
        body += props(properties)
    return packet(0x30 | (qos << 1) | int(retain), body + payload)


def subscribe(level, pkid, *filters, properties=b""):
    body = struct.pack(">H", pkid) + (props(properties) if level == 5 else b"")
    for f, options in filters:
        body += s(f) + bytes([options])
    return packet(0x82, body)


def unsubscribe(level, pkid, *filters):
    body = struct.pack(">H", pkid) + (props(b"") if level == 5 else b"")
    return packet(0xA2, body + b"".join(s(f) for f in filters))


def ack(kind, pkid, level, reason=None):
    first = {"puback": 0x40, "pubrec": 0x50, "pubrel": 0x62, "pubcomp": 0x70}[kind]
    body = struct.pack(">H", pkid)
    if level == 5 and reason is not None:
        body += bytes([reason]) + props(b"")
    return packet(first, body)


PING = packet(0xC0, b"")
DISC = packet(0xE0, b"")
DISC5 = packet(0xE0, bytes([0x04]) + props(b"\x11" + struct.pack(">I", 60)))
USER = b"\x26" + s("k") + s("v")

MQTT = {
    "v311-echo": connect(4, "c1") + subscribe(4, 1, ("a/b", 0)) + publish(4, "a/b", b"hi") + PING + DISC,
    "v311-qos": connect(4, "c2") + subscribe(4, 1, ("q/#", 2)) + publish(4, "q/1", b"one", qos=1, pkid=7)
    + publish(4, "q/2", b"two", qos=2, pkid=8) + ack("pubrel", 8, 4) + ack("puback", 1, 4)
    + ack("pubrec", 2, 4) + ack("pubcomp", 2, 4) + unsubscribe(4, 3, "q/#") + DISC,
    "v311-will-login": connect(4, "c3", flags=0x02 | 0x04 | 0x08 | 0x20 | 0xC0, tail=s("will/t") + s("bye") + s("u") + s("p"))
    + publish(4, "r", b"kept", retain=True) + subscribe(4, 2, ("+/t", 1), ("r", 0), ("$share/g/x", 0)),
    "v311-empty-id": connect(4, "") + PING,
    "v5-echo": connect(5, "c4", properties=b"\x11" + struct.pack(">I", 30) + b"\x21" + struct.pack(">H", 10) + USER)
    + subscribe(5, 1, ("a/+", 0x15), properties=b"\x0b\x05" + USER)
    + publish(5, "a/b", b"hi", qos=1, properties=b"\x01\x01\x02" + struct.pack(">I", 60) + b"\x03" + s("text/plain") + USER)
    + ack("puback", 1, 5, reason=0x10) + DISC5,
    "v5-alias": connect(5, "c5") + publish(5, "alias/one", b"1", properties=b"\x23\x00\x01")
    + publish(5, "", b"2", properties=b"\x23\x00\x01") + publish(5, "", b"3", properties=b"\x23\x00\x09"),
    "v5-will": connect(5, "c6", flags=0x02 | 0x04 | 0x10, tail=props(b"\x18" + struct.pack(">I", 1) + USER) + s("w/t") + s("bye"))
    + packet(0xE0, bytes([0x04]) + props(b"")),
    "v5-response": connect(5, "c7", properties=b"\x19\x01\x17\x01") + publish(5, "req", b"x", qos=2, pkid=3,
        properties=b"\x08" + s("resp/c7") + b"\x09" + s("corr")) + ack("pubrel", 3, 5, reason=0)
    + unsubscribe(5, 4, "nothing", "req"),
    "v5-auth": connect(5, "c8", properties=b"\x15" + s("SCRAM") + b"\x16" + s("data")) + packet(0xF0, b"\x18" + props(b"")),
    "server-packets": connect(4, "c9") + packet(0x20, b"\x00\x00") + packet(0x90, b"\x00\x01\x00") + packet(0xB0, b"\x00\x01") + packet(0xD0, b""),
}

HTTP = {
    "upgrade": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58" + b"\x88\x82\x00\x00\x00\x00\x03\xe8",
    "upgrade-mqtt": b"GET /mqtt HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqttv3.1, mqtt\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\nOrigin: http://h\r\n\r\n"
    b"\x82\x90\x00\x00\x00\x00" + connect(4, "w"),
    "page": b"GET / HTTP/1.1\r\nHost: localhost:8080\r\nAccept: text/html\r\nUser-Agent: fuzz\r\n\r\n",
    "head-and-post": b"HEAD /x?y=1 HTTP/1.0\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    "folded": b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: " + b"v" * 300 + b"\r\n\tcontinued\r\nUpgrade: WebSocket\r\n\r\n",
}

for folder, seeds in (("mqtt", MQTT), ("http", HTTP)):
    for name, data in seeds.items():
        with open(os.path.join(HERE, folder, name + ".bin"), "wb") as f:
            f.write(data)
