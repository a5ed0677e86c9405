#!/usr/bin/env python3
"""The attacks of "one client must never stall or swell the server", each a
subcommand: raw sockets and hand-built MQTT packets, Python 3 stdlib only.

    python3 loadtest/attacks/hostile.py ATTACK --mqtt HOST:PORT --ws HOST:PORT \
        --admin HOST:PORT [--quick] [--duration SECS] [--count N]

Every attack is bounded: it is present for at most --duration seconds
(count-based attacks stop early when the count is done and then hold what
they built until the end; whatever is not done by then is left undone and
reported), then closes everything and prints ONE JSON line on stdout: what
it did, and what the server answered (CONNACK / SUBACK / PUBREC counts,
DISCONNECT reason codes, whether the server closed the connection).
--quick is the miniature CI runs (small counts; --duration is the
caller's). loadtest/hostile.sh runs each one beside a bystander client.
"""

import argparse
import base64
import collections
import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

# A SIGTERM (hostile.sh stopping the attack early) makes every deadline
# pass at once: the attack winds down the normal way and reports what it did.
STOPPED = False


def now():
    return math.inf if STOPPED else time.monotonic()


def on_sigterm(_sig, _frame):
    global STOPPED
    STOPPED = True


# ---------------------------------------------------------------- MQTT bytes


def varint(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def mstr(b):
    if isinstance(b, str):
        b = b.encode()
    return len(b).to_bytes(2, "big") + b


def packet(first, body):
    return bytes([first]) + varint(len(body)) + body


def connect(client_id, version=4, keep_alive=0, clean=True):
    """CONNECT: 3.1.1 (version 4) or 5, no will, no credentials."""
    body = mstr("MQTT") + bytes([version, 0x02 if clean else 0]) + keep_alive.to_bytes(2, "big")
    if version == 5:
        body += varint(0)  # no properties
    return packet(0x10, body + mstr(client_id))


def subscribe(pid, filters, version=4, qos=0):
    body = pid.to_bytes(2, "big")
    if version == 5:
        body += varint(0)
    for f in filters:
        body += mstr(f) + bytes([qos])
    return packet(0x82, body)


def publish(topic, payload, qos=0, pid=None, version=4, alias=None, retain=False):
    body = mstr(topic)
    if qos:
        body += pid.to_bytes(2, "big")
    if version == 5:
        props = b"" if alias is None else b"\x23" + alias.to_bytes(2, "big")
        body += varint(len(props)) + props
    return packet(0x30 | (qos << 1) | retain, body + payload)


DISCONNECT = b"\xe0\x00"


class MqttReader:
    """Parses what the server sends on one MQTT byte stream and tallies it."""

    def __init__(self):
        self.buf = bytearray()
        self.types = collections.Counter()
        self.connack = []  # return / reason codes, in order
        self.connack_props = {}
        self.suback = collections.Counter()  # code -> count
        self.acks = collections.Counter()  # "puback 0x97" -> count (MQTT 5 reason codes)
        self.disconnect = []  # reason codes (MQTT 5; None for an empty one)
        self.version = 4

    def feed(self, data):
        self.buf += data
        while True:
            if len(self.buf) < 2:
                return
            n, mult, i = 0, 1, 1
            while True:
                if i >= len(self.buf):
                    return
                b = self.buf[i]
                n += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    break
            if len(self.buf) < i + n:
                return
            first, body = self.buf[0], bytes(self.buf[i : i + n])
            del self.buf[: i + n]
            self.on_packet(first >> 4, body)

    def on_packet(self, kind, body):
        name = {2: "connack", 3: "publish", 4: "puback", 5: "pubrec", 6: "pubrel", 7: "pubcomp",
                9: "suback", 11: "unsuback", 13: "pingresp", 14: "disconnect"}.get(kind, str(kind))
        self.types[name] += 1
        if kind == 2 and len(body) >= 2:
            self.connack.append(body[1])
            if self.version == 5 and len(body) > 2:
                self.connack_props = parse_props(body[2:])
        elif kind == 9:
            codes = body[2:]
            if self.version == 5:
                plen, used = read_varint(codes)
                codes = codes[used + plen :]
            for c in codes:
                self.suback["0x%02x" % c] += 1
        elif kind in (4, 5):
            self.acks["%s 0x%02x" % (name, body[2] if len(body) > 2 else 0)] += 1
        elif kind == 14:
            self.disconnect.append("0x%02x" % body[0] if body else None)


def read_varint(b):
    n, mult, i = 0, 1, 0
    while i < len(b):
        n += (b[i] & 0x7F) * mult
        mult *= 128
        i += 1
        if not b[i - 1] & 0x80:
            break
    return n, i


def parse_props(b):
    """The CONNACK properties this script cares about (MQTT 5 §3.2.2.3)."""
    plen, i = read_varint(b)
    end, props = i + plen, {}
    two = {0x21: "receive_maximum", 0x22: "topic_alias_maximum", 0x13: "server_keep_alive"}
    four = {0x27: "maximum_packet_size", 0x11: "session_expiry_interval"}
    one = {0x24: "maximum_qos", 0x25: "retain_available", 0x28: "wildcard_available",
           0x29: "subscription_ids_available", 0x2A: "shared_available"}
    while i < end:
        p = b[i]
        i += 1
        if p in two:
            props[two[p]] = int.from_bytes(b[i : i + 2], "big"); i += 2
        elif p in four:
            props[four[p]] = int.from_bytes(b[i : i + 4], "big"); i += 4
        elif p in one:
            props[one[p]] = b[i]; i += 1
        elif p in (0x12, 0x1A, 0x1C, 0x1F, 0x15):  # strings
            n = int.from_bytes(b[i : i + 2], "big"); i += 2 + n
        elif p == 0x26:  # user property: two strings
            for _ in range(2):
                n = int.from_bytes(b[i : i + 2], "big"); i += 2 + n
        else:
            break  # unknown: stop rather than misread
    return props


# ------------------------------------------------------------- connections


def hostport(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


class Conn:
    """One connection to the broker, MQTT over TCP or over WebSocket, with a
    reader thread that drains and tallies everything the server sends (so
    the server is never blocked on writing to us: what is measured is what
    the attack makes the server do, not a stalled reader)."""

    def __init__(self, addr, ws=False, version=4, path="/mqtt", timeout=10.0):
        self.sock = socket.create_connection(hostport(addr), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ws = ws
        self.mqtt = MqttReader()
        self.mqtt.version = version
        self.closed_by_server = False  # EOF or reset from the server
        self.ws_close = None  # close code of a WebSocket close frame
        self.http_status = None
        self.sent_bytes = 0
        self.wbuf = bytearray()  # WebSocket: bytes of a partly received frame
        if ws:
            self._upgrade(addr, path)
        self.sock.settimeout(None)
        self.sock.setblocking(False)
        self.lock = threading.Lock()
        self.reading = True  # False: the reader thread leaves the socket alone
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _upgrade(self, addr, path):
        key = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n")
        self.sock.sendall(req.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the server closed during the WebSocket upgrade")
            head += chunk
        head, rest = head.split(b"\r\n\r\n", 1)
        self.http_status = int(head.split(b" ", 2)[1])
        if self.http_status != 101:
            raise ConnectionError(f"WebSocket upgrade answered HTTP {self.http_status}")
        if b"sec-websocket-protocol: mqtt" not in head.lower():
            raise ConnectionError("the server did not select the mqtt subprotocol")
        if rest:
            self._ws_feed(rest)

    def _ws_feed(self, data):
        self.wbuf += data
        while len(self.wbuf) >= 2:
            op, n, i = self.wbuf[0] & 0x0F, self.wbuf[1] & 0x7F, 2
            if n == 126:
                if len(self.wbuf) < 4:
                    return
                n, i = int.from_bytes(self.wbuf[2:4], "big"), 4
            elif n == 127:
                if len(self.wbuf) < 10:
                    return
                n, i = int.from_bytes(self.wbuf[2:10], "big"), 10
            if len(self.wbuf) < i + n:
                return
            payload = bytes(self.wbuf[i : i + n])
            del self.wbuf[: i + n]
            if op in (0, 2):
                self.mqtt.feed(payload)
            elif op == 8:
                self.ws_close = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005

    def _read(self):
        while True:
            if not self.reading:
                if self.sock.fileno() < 0:
                    return
                time.sleep(0.05)
                continue
            try:
                r, _, _ = select.select([self.sock], [], [], 0.5)
                if not r:
                    if self.sock.fileno() < 0:
                        return
                    continue
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                continue
            except (OSError, ValueError):
                if self.sock.fileno() >= 0:
                    self.closed_by_server = True
                return
            if not data:
                self.closed_by_server = True
                return
            with self.lock:
                if self.ws:
                    self._ws_feed(data)
                else:
                    self.mqtt.feed(data)

    def frame(self, data):
        """WebSocket: one masked binary frame (mask key 0: XOR is a no-op)."""
        n = len(data)
        if n < 126:
            head = bytes([0x82, 0x80 | n])
        elif n < 65536:
            head = bytes([0x82, 0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head = bytes([0x82, 0x80 | 127]) + n.to_bytes(8, "big")
        return head + b"\0\0\0\0" + data

    def send(self, data, deadline):
        """Writes all of `data` unless the deadline comes first (the server
        not reading). Returns the bytes of `data` written (WebSocket framing
        not counted)."""
        raw = self.frame(data) if self.ws else data
        view, off = memoryview(raw), 0
        while off < len(raw):
            left = deadline - now()
            if left <= 0 or self.closed_by_server:
                break
            try:
                _, w, _ = select.select([], [self.sock], [], min(left, 0.5))
                if w:
                    off += self.sock.send(view[off : off + (1 << 20)])
            except BlockingIOError:
                continue
            except OSError:
                self.closed_by_server = True
                break
        head = len(raw) - len(data)
        done = max(0, off - head) if self.ws else off
        self.sent_bytes += done
        return done

    def wait(self, cond, deadline):
        """Waits until cond(self.mqtt) is true, the server closed, or the deadline."""
        while now() < deadline and not self.closed_by_server:
            with self.lock:
                if cond(self.mqtt):
                    return True
            time.sleep(0.005)
        with self.lock:
            return cond(self.mqtt)

    def close(self, disconnect=True):
        if disconnect and not self.closed_by_server:
            try:
                self.sock.setblocking(True)
                self.sock.settimeout(0.5)
                self.sock.sendall(self.frame(DISCONNECT) if self.ws else DISCONNECT)
            except OSError:
                pass
        try:
            self.sock.close()
        except OSError:
            pass

    def report(self):
        with self.lock:
            m = self.mqtt
            out = {"server_closed": self.closed_by_server, "connack": m.connack,
                   "received": dict(m.types)}
            if m.suback:
                out["suback"] = dict(m.suback)
            if m.acks:
                out["acks"] = dict(m.acks)
            if m.disconnect:
                out["disconnect_reasons"] = m.disconnect
            if m.connack_props:
                out["connack_properties"] = m.connack_props
            if self.ws_close is not None:
                out["ws_close_code"] = self.ws_close
            return out


def remaining(deadline, cap):
    """A socket timeout that does not outlast the deadline."""
    return max(0.05, min(cap, deadline - now()))


def open_session(args, client_id, version=4, ws=False, deadline=None):
    c = Conn(args.ws if ws else args.mqtt, ws=ws, version=version,
             timeout=remaining(deadline, 10) if deadline else 10.0)
    c.send(connect(client_id, version=version), deadline or now() + 10)
    c.wait(lambda m: m.connack, deadline or now() + 10)
    return c


def hold_until(deadline, conns=()):
    """Stays connected until the deadline (or every connection was closed)."""
    while now() < deadline:
        if conns and all(c.closed_by_server for c in conns):
            return
        time.sleep(0.05)


# ----------------------------------------------------------------- attacks
# Each returns the dict printed; `deadline` is when it must be gone.


def flood(args, deadline, ws):
    c = open_session(args, "flood-ws" if ws else "flood-tcp", ws=ws, deadline=deadline)
    chunk = (b"\x30\x0b\x00\x01t" + b"x" * 8) * 5000  # 5,000 publishes of 8 bytes to "t"
    sent = 0
    while now() < deadline and not c.closed_by_server:
        sent += c.send(chunk, deadline)
    rep = c.report()
    c.close()
    return {"publishes_sent": sent // 13, "bytes_sent": sent, **rep}


def close_all(socks):
    """Closes every socket; returns how many the server had closed first."""
    closed = 0
    for s in socks:
        try:
            s.setblocking(False)
            if s.recv(1) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    return closed


def attack_flood_tcp(args, deadline):
    return flood(args, deadline, ws=False)


def attack_flood_ws(args, deadline):
    return flood(args, deadline, ws=True)


def attack_qos2_unreleased(args, deadline):
    n = args.count or (100 if args.quick else 2000)
    size = 500_000
    c = open_session(args, "qos2", deadline=deadline)
    payload = b"q" * size
    sent = 0
    for i in range(n):
        if now() >= deadline or c.closed_by_server:
            break
        pkt = publish("q2/%d" % (i % 16), payload, qos=2, pid=i % 65535 + 1)
        if c.send(pkt, deadline) < len(pkt):
            break
        sent += 1
    got_all = c.wait(lambda m: m.types["pubrec"] >= sent, min(deadline, now() + 2))
    hold_until(deadline, [c])  # never PUBREL: the server keeps every one
    rep = c.report()
    c.close()
    return {"publishes_sent": sent, "of": n, "payload_bytes": size, "all_pubrec": got_all, **rep}


def subscribe_many(c, filters, per_packet, deadline, version=4):
    """Sends the filters in SUBSCRIBE packets of `per_packet`; returns
    (filters sent, packets sent)."""
    sent = packets = 0
    for i in range(0, len(filters), per_packet):
        if now() >= deadline or c.closed_by_server:
            break
        part = filters[i : i + per_packet]
        pkt = subscribe(packets % 65535 + 1, part, version=version)
        if c.send(pkt, deadline) < len(pkt):
            break
        sent += len(part)
        packets += 1
    return sent, packets


def subacked(m):
    return sum(m.suback.values())


def attack_many_filters(args, deadline):
    n = args.count or (20_000 if args.quick else 500_000)
    c = open_session(args, "many-filters", deadline=deadline)
    filters = [b"m/%d" % i for i in range(n)]
    t0 = time.monotonic()
    sent, packets = subscribe_many(c, filters, 1000, deadline)
    c.wait(lambda m: subacked(m) >= sent, deadline)
    secs = time.monotonic() - t0
    hold_until(deadline, [c])
    rep = c.report()
    c.close()
    return {"filters_sent": sent, "of": n, "subscribe_packets": packets,
            "subacked_in_s": round(secs, 2), **rep}


def attack_hoarder(args, deadline):
    """A client that holds 1,000 filters (mqtt.max_subscriptions) and stops
    reading, while its second connection publishes 64-byte messages to all
    of them as fast as the server takes them: each topic's log keeps what
    the hoarder has not read, up to the log's own bound (~0.5 MB a topic by
    default, ~0.5 GB in all) unless a per-session cap
    (mqtt.max_queued_messages / max_queued_bytes) stops it first. The
    server's write_timeout closes the hoarder in the end (30 s)."""
    n = args.count or (200 if args.quick else 1000)
    hoarder = open_session(args, "hoarder", deadline=deadline)
    filters = [b"hoard/%d" % i for i in range(n)]
    subscribed, _ = subscribe_many(hoarder, filters, 100, deadline)
    hoarder.wait(lambda m: subacked(m) >= subscribed, deadline)
    hoarder.reading = False
    publisher = open_session(args, "hoarder-publisher", deadline=deadline)
    batch = b"".join(publish(f, b"p" * 64) for f in filters[:subscribed])
    published = 0
    while now() < deadline and not publisher.closed_by_server:
        done = publisher.send(batch, deadline)
        published += done * subscribed // max(1, len(batch))
        if done < len(batch):
            break
    hold_until(deadline, [hoarder])
    rep = hoarder.report()
    hoarder.close()
    publisher.close()
    return {"filters": subscribed, "publishes_sent": published, **rep}


def attack_long_filters(args, deadline):
    n = args.count or (200 if args.quick else 4500)
    size = 65_000
    c = open_session(args, "long-filters", deadline=deadline)
    filters = []
    for i in range(n):
        head = b"l/%d/" % i
        filters.append(head + b"f" * (size - len(head)))
    # 15 filters of 65 KB per SUBSCRIBE: just under the 1 MiB packet limit.
    sent, packets = subscribe_many(c, filters, 15, deadline)
    c.wait(lambda m: subacked(m) >= sent, min(deadline, now() + 5))
    hold_until(deadline, [c])
    rep = c.report()
    c.close()
    return {"filters_sent": sent, "of": n, "filter_bytes": size, "subscribe_packets": packets, **rep}


def attack_long_client_ids(args, deadline):
    n = args.count or (100 if args.quick else 2000)
    size = 65_535  # the longest an MQTT string can be
    conns, codes, refused, errors = [], collections.Counter(), 0, collections.Counter()
    for i in range(n):
        if now() >= deadline:
            break
        head = b"id-%d-" % i
        cid = head + b"c" * (size - len(head))
        try:
            s = socket.create_connection(hostport(args.mqtt), timeout=remaining(deadline, 5))
            s.sendall(connect(cid))
            ack = b""
            while len(ack) < 4:
                part = s.recv(4 - len(ack))
                if not part:
                    break
                ack += part
        except OSError as e:
            errors[type(e).__name__] += 1
            continue
        if len(ack) == 4 and ack[0] == 0x20:
            codes["0x%02x" % ack[3]] += 1
            conns.append(s)
        else:
            refused += 1
            s.close()
    opened = len(conns)
    hold_until(deadline)
    closed = close_all(conns)
    return {"connections": opened, "of": n, "client_id_bytes": size, "connack": dict(codes),
            "closed_without_connack": refused, "connect_errors": dict(errors),
            "server_closed": closed}


def attack_topic_aliases(args, deadline):
    conns_n, aliases = (1, args.count or 200) if args.quick else (4, args.count or 4096)
    size = 60_000
    conns = [open_session(args, "alias-%d" % k, version=5, deadline=deadline) for k in range(conns_n)]
    filler = b"a" * size
    sent = 0
    for a in range(1, aliases + 1):
        for k, c in enumerate(conns):
            if now() >= deadline or c.closed_by_server:
                continue
            head = b"ta/%d/%d/" % (k, a)
            pkt = publish(head + filler[: size - len(head)], b"x", version=5, alias=a)
            if c.send(pkt, deadline) == len(pkt):
                sent += 1
        if now() >= deadline or all(c.closed_by_server for c in conns):
            break
    hold_until(deadline, conns)
    reps = [c.report() for c in conns]
    for c in conns:
        c.close()
    return {"connections": conns_n, "aliases_per_connection": aliases, "topic_bytes": size,
            "publishes_sent": sent, "of": conns_n * aliases,
            # Absent from CONNACK means 0: the client may not use aliases at all.
            "topic_alias_maximum": reps[0].get("connack_properties", {}).get("topic_alias_maximum", 0),
            "server_closed": sum(r["server_closed"] for r in reps),
            "connack": [x for r in reps for x in r["connack"]],
            "disconnect_reasons": [x for r in reps for x in r.get("disconnect_reasons", [])]}


def attack_distinct_topics(args, deadline):
    n = args.count or (20_000 if args.quick else 1_000_000)
    size = 1000
    c = open_session(args, "distinct-topics", deadline=deadline)
    filler = b"d" * size
    sent = 0
    batch = 500
    for start in range(0, n, batch):
        if now() >= deadline or c.closed_by_server:
            break
        pkts = []
        for i in range(start, min(n, start + batch)):
            head = b"d/%d/" % i
            pkts.append(publish(head + filler[: size - len(head)], b"12345678"))
        data = b"".join(pkts)
        done = c.send(data, deadline)
        if done < len(data):
            sent += done // len(pkts[0])
            break
        sent += len(pkts)
    hold_until(deadline, [c])
    rep = c.report()
    c.close()
    return {"publishes_sent": sent, "of": n, "topic_bytes": size, **rep}


def attack_wildcard_disconnect(args, deadline):
    n = args.count or (5000 if args.quick else 50_000)
    start = time.monotonic()
    # Half the time for the filters, then publish until 70% of it, then leave
    # while the bystander is still measuring.
    sub_until = start + (deadline - start) * 0.5
    c = open_session(args, "wildcard-disconnect", deadline=sub_until)
    filters = [b"w/%d/+" % i for i in range(n)]
    sent, _ = subscribe_many(c, filters, 1000, sub_until)
    c.wait(lambda m: subacked(m) >= sent, sub_until)
    subacked_n = subacked(c.mqtt)
    pub_until = start + (deadline - start) * 0.7
    most = 20_000 if args.quick else 1_000_000  # fresh topics: each one is kept by the router
    published, i = 0, 0
    while now() < pub_until and not c.closed_by_server and i < most:
        data = b"".join(publish(b"w/%d/%d" % ((i + k) % n, i + k), b"12345678") for k in range(200))
        done = c.send(data, pub_until)
        published += done * 200 // len(data)
        i += 200
        if done < len(data):
            break
    rep = c.report()
    t = time.monotonic()
    c.close()  # DISCONNECT: the server must drop every filter and topic at once
    return {"filters_sent": sent, "of": n, "subacked": subacked_n, "publishes_sent": published, "publishes_of": most,
            "disconnected_at_s": round(t - start, 2), **rep}


def attack_takeover(args, deadline):
    clients = 4
    stats = collections.Counter()
    reasons = collections.Counter()
    lock = threading.Lock()

    def loop():
        while now() < deadline:
            try:
                s = socket.create_connection(hostport(args.mqtt), timeout=remaining(deadline, 2))
                s.settimeout(remaining(deadline, 2))
                s.sendall(connect("takeover", version=5))
                r = MqttReader()
                r.version = 5
                end = now() + 0.2
                server_closed = False
                while now() < min(end, deadline):
                    try:
                        data = s.recv(4096)
                    except socket.timeout:
                        break
                    if not data:
                        server_closed = True
                        break
                    r.feed(data)
                    if r.connack:
                        s.settimeout(max(0.001, min(end, deadline) - now()))
                s.close()
            except OSError as e:
                with lock:
                    stats["errors_" + type(e).__name__] += 1
                continue
            with lock:
                stats["connects"] += 1
                stats["connack"] += len(r.connack)
                stats["taken_over"] += bool(r.connack) and (server_closed or bool(r.disconnect))
                stats["closed_without_connack"] += not r.connack and server_closed
                for code in r.disconnect:
                    reasons[code] += 1

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0, deadline - now()) + 3)
    return {"clients": clients, "client_id": "takeover", **dict(stats),
            "disconnect_reasons": dict(reasons)}


def attack_admin_idle(args, deadline):
    n = args.count or (200 if args.quick else 1000)
    socks, errors = [], collections.Counter()
    for _ in range(n):
        try:
            socks.append(socket.create_connection(hostport(args.admin), timeout=remaining(deadline, 2)))
        except OSError as e:
            errors[type(e).__name__] += 1
    cmd = args.healthcheck.split() if args.healthcheck else None
    checks = failures = 0
    slowest = 0.0
    while now() < deadline - 0.2:
        t = time.monotonic()
        ok = False
        if cmd:
            try:
                ok = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    timeout=10).returncode == 0
            except subprocess.TimeoutExpired:
                pass
        else:  # GET /healthz by hand, 3 s limit (the healthcheck's default)
            try:
                with socket.create_connection(hostport(args.admin), timeout=3) as s:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    ok = s.recv(64).startswith(b"HTTP/1.1 200")
            except OSError:
                pass
        slowest = max(slowest, time.monotonic() - t)
        checks += 1
        failures += not ok
        time.sleep(0.2)
    closed = close_all(socks)
    return {"idle_sockets": len(socks), "of": n, "connect_errors": dict(errors), "healthchecks": checks,
            "healthcheck_failures": failures, "slowest_healthcheck_ms": round(slowest * 1000, 1),
            "server_closed": closed}


class AsyncConn:
    """An MQTT connection for asyncio: a task drains and tallies what the
    server sends. The crowd runs every client in one thread, so that it
    does not outnumber the bystander's threads on their shared CPU (each
    thread, even at nice 19, gets its own share of the CPU)."""

    @classmethod
    async def open(cls, args, client_id, version, clean, deadline):
        import asyncio
        self = cls()
        self.m, self.closed, self.deadline = MqttReader(), False, deadline
        self.m.version = version
        host, port = hostport(args.mqtt)
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), max(0.05, deadline - now()))
        self.task = asyncio.ensure_future(self._pump())
        await self.send(connect(client_id, version=version, clean=clean))
        await self.wait(lambda m: m.connack, 10)
        return self

    async def _pump(self):
        try:
            while True:
                data = await self.reader.read(1 << 16)
                if not data:
                    break
                self.m.feed(data)
        except OSError:
            pass
        self.closed = True

    async def send(self, data):
        """Sends unless the server has closed; waits for the socket to take
        it until the deadline (a server that does not read holds us there)."""
        import asyncio
        if self.closed or now() >= self.deadline:
            return False
        self.writer.write(data)
        try:
            await asyncio.wait_for(self.writer.drain(), max(0.01, self.deadline - now()))
            return True
        except (asyncio.TimeoutError, OSError):
            return False

    async def wait(self, cond, most):
        import asyncio
        end = min(self.deadline, now() + most)
        while not cond(self.m) and not self.closed and now() < end:
            await asyncio.sleep(0.01)
        return cond(self.m)

    def close(self):
        if not self.closed:
            try:
                self.writer.write(DISCONNECT)
            except OSError:
                pass
        self.writer.close()
        self.task.cancel()


def attack_crowd(args, deadline):
    """Many clients, each trying every memory case above at once, each up to
    the per-client caps: unreleased QoS 2 publishes at the largest packet
    size, a thousand 1 KB filters, 256-byte client ids, ten 1 KB topic
    aliases, retained messages on fresh topics, QoS 0 to fresh topics,
    sessions that outlive their connections, and large publishes (and a
    WebSocket message) sent by half. What stops them is the server-wide budget (server.memory_limit):
    hostile.sh starts the server with one for this attack and checks the
    RSS peak against it."""
    import asyncio
    n = args.count or (20 if args.quick else 100)
    big = 1_000_000  # under mqtt.max_payload_size (1 MiB) with its header
    tally = collections.Counter()
    conns = []
    ws_conns = []

    def pad(head, size):
        return head + b"x" * (size - len(head))

    def count(c):
        m = c.m
        for code in m.connack:
            tally["connack 0x%02x" % code] += 1
        for code, k in m.suback.items():
            tally["suback " + code] += k
        for code, k in m.acks.items():
            tally[code] += k
        tally["server_closed"] += c.closed

    async def opened(client_id, version, clean=True):
        try:
            c = await AsyncConn.open(args, client_id, version, clean, deadline)
        except (OSError, asyncio.TimeoutError) as e:
            tally["errors_" + type(e).__name__] += 1
            return None
        conns.append(c)
        return c if c.m.connack[:1] == [0] else None

    async def one(k):
        c = await opened(pad(b"crowd-%d-" % k, 256), 5)
        if not c:
            return
        filters = [pad(b"c/%d/%d/" % (k, i), 1000) for i in range(1000)]
        for i in range(0, 1000, 50):
            await c.send(subscribe(i // 50 + 1, filters[i : i + 50], version=5))
        for a in range(1, 11):
            await c.send(publish(pad(b"a/%d/%d/" % (k, a), 1000), b"x", version=5, alias=a))
        for pid in range(1, 33):  # Receive Maximum: never released
            await c.send(publish(b"q/%d" % k, b"q" * big, qos=2, pid=pid, version=5))
        half = await opened(pad(b"half-%d-" % k, 256), 5)
        if half:
            whole = publish(b"h/%d" % k, b"h" * big, qos=1, pid=1, version=5)
            await half.send(whole[: len(whole) // 2])
        if args.ws:
            await half_a_websocket_message(k)
        # Then, until the deadline: retained messages and QoS 0 on fresh
        # topics, and sessions that outlive their connections.
        i = 0
        while now() < deadline and not c.closed:
            retained = publish(b"r/%d/%d" % (k, i), b"r" * (big // 10), qos=1, pid=i % 65000 + 100,
                               version=5, retain=True)
            await c.send(retained)
            await c.send(b"".join(publish(pad(b"d/%d/%d/%d/" % (k, i, j), 1000), b"d", version=5)
                                  for j in range(20)))
            s = await opened(b"p-%d-%d" % (k, i), 4, clean=False)
            tally["persistent_sessions_tried"] += 1
            if s:
                kept = [pad(b"p/%d/%d/%d/" % (k, i, j), 1000) for j in range(100)]
                await s.send(subscribe(1, kept[:50]) + subscribe(2, kept[50:]))
                await s.wait(lambda m: subacked(m) >= 100, 5)
                s.close()
            i += 1
            await asyncio.sleep(0.05)

    async def half_a_websocket_message(k):
        """A WebSocket echo client that sends half of a 1 MB message."""
        host, port = hostport(args.ws)
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port), max(0.05, deadline - now()))
            key = base64.b64encode(os.urandom(16)).decode()
            w.write((f"GET / HTTP/1.1\r\nHost: {args.ws}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), max(0.05, deadline - now()))
            tally["websocket " + head.split(b" ", 2)[1].decode()] += 1
            if head.startswith(b"HTTP/1.1 101"):
                frame = bytes([0x82, 0xFF]) + big.to_bytes(8, "big") + b"\0\0\0\0" + b"w" * big
                w.write(frame[: len(frame) // 2])
            ws_conns.append(w)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            tally["errors_websocket_" + type(e).__name__] += 1

    async def crowd():
        clients = asyncio.gather(*(one(k) for k in range(n)), return_exceptions=True)
        try:
            await asyncio.wait_for(clients, max(0.1, deadline - now()) + 5)
        except asyncio.TimeoutError:
            tally["clients_cut_at_deadline"] += 1
        while now() < deadline:
            await asyncio.sleep(0.05)
        for c in conns:
            count(c)
            c.close()
        for w in ws_conns:
            w.close()
        await asyncio.sleep(0.1)

    asyncio.run(crowd())
    return {"clients": n, **dict(sorted(tally.items()))}


# ----------------------------------------------------------------- warm-up


def warm_up(args, deadline):
    """What ordinary clients do, once, before the server's RSS "before" is
    read: the first MQTT client starts the router's heap arena and tables,
    the first WebSocket client the handshake's, and code paths that ran are
    resident pages too. Measured from a server that has served nobody,
    "after" an attack would count those first-use costs as what the
    attacker kept. Not an attack: not in `list`."""
    out = {}
    for name, version, ws in (("warm-311", 4, False), ("warm-5", 5, False), ("warm-ws", 4, True)):
        c = open_session(args, name, version=version, ws=ws, deadline=deadline)
        c.send(subscribe(1, [name + "/own", "warm/+"], version=version), deadline)
        c.wait(lambda m: m.suback, deadline)
        c.send(publish(name + "/own", b"hello", version=version)
               + publish("warm/" + name, b"hello", qos=1, pid=2, version=version)
               + publish("warm/retained", b"kept", qos=1, pid=3, version=version, retain=True)
               + publish("warm/retained", b"", qos=1, pid=4, version=version, retain=True), deadline)
        c.wait(lambda m: m.types["publish"] >= 2 and sum(m.acks.values()) >= 3, deadline)
        out[name] = c.report()["received"]
        c.close()
    out["websocket_echo"] = websocket_echo(args.ws, deadline)
    out["http_echo"] = http_echo_once(args.ws, deadline)
    return out


def http_echo_once(addr, deadline):
    """One plain HTTP request echoed (websocket.http_echo); its status."""
    s = socket.create_connection(hostport(addr), timeout=remaining(deadline, 5))
    s.sendall(f"POST /warm?up=1 HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 4\r\nConnection: close\r\n\r\nwarm".encode())
    got = b""
    while now() < deadline:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    s.close()
    return int(got.split(b" ", 2)[1]) if got.startswith(b"HTTP/") else None


def websocket_echo(addr, deadline):
    """One WebSocket echo round trip at "/"; whether it came back."""
    s = socket.create_connection(hostport(addr), timeout=remaining(deadline, 5))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    got = b""
    # An unmasked reply to a masked text frame "warm" (mask key 0), after the 101.
    s.sendall(bytes([0x81, 0x84]) + b"\0\0\0\0" + b"warm")
    while b"warm" not in got.split(b"\r\n\r\n", 1)[-1] and now() < deadline:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    s.sendall(bytes([0x88, 0x82]) + b"\0\0\0\0" + (1000).to_bytes(2, "big"))
    s.close()
    return got.startswith(b"HTTP/1.1 101") and b"warm" in got.split(b"\r\n\r\n", 1)[-1]


# ------------------------------------------------------------ HTTP echo
# Clients of the WebSocket port's HTTP echo (websocket.http_echo), each
# within the limits: what they cost the others is the event loop's time.


async def http_response(reader):
    """Reads one response (the server always sends Content-Length): its
    status and how many bytes it took."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1]), len(head) + length


def http_clients(args, deadline, n, client):
    """Runs `n` connections to the HTTP echo, each `client(reader, writer,
    deadline, tally)`, in one thread (asyncio); returns the tally."""
    import asyncio
    tally = collections.Counter()

    async def one():
        try:
            reader, writer = await asyncio.open_connection(*hostport(args.ws))
        except OSError as e:
            tally["connect_error " + type(e).__name__] += 1
            return
        try:
            await asyncio.wait_for(client(reader, writer, deadline, tally), max(0.1, deadline - now() + 5))
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
            tally["ended " + type(e).__name__] += 1
        writer.close()

    async def all_of_them():
        await asyncio.gather(*(one() for _ in range(n)))

    asyncio.run(all_of_them())
    return {"connections": n, **dict(tally)}


def attack_http_stream(args, deadline):
    """Connections posting 1 MiB chunked bodies (16 KiB chunks; the default
    websocket.max_request_body_size) back to back, reading each echo."""
    chunk = b"4000\r\n" + b"s" * 0x4000 + b"\r\n"

    async def client(reader, writer, deadline, tally):
        while now() < deadline:
            writer.write(b"POST /stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(64):
                writer.write(chunk)
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            status, size = await http_response(reader)
            tally[f"status {status}"] += 1
            tally["bytes_received"] += size

    return http_clients(args, deadline, args.count or (2 if args.quick else 4), client)


def attack_http_drip(args, deadline):
    """Connections each dripping a chunked body, one byte every 0.5 s, for
    as long as they are present (under websocket.handshake_timeout, so
    that each stays a legitimate, slow request)."""
    async def client(reader, writer, deadline, tally):
        import asyncio
        writer.write(b"POST /drip HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        while now() < deadline:
            writer.write(b"1\r\nd\r\n")
            await writer.drain()
            tally["bytes_dripped"] += 1
            await asyncio.sleep(0.5)
        writer.write(b"0\r\n\r\n")
        status, _ = await http_response(reader)
        tally[f"status {status}"] += 1

    return http_clients(args, deadline, args.count or (50 if args.quick else 200), client)


def attack_http_pipeline(args, deadline):
    """Keep-alive connections each writing 50 GETs at once (pipelined) and
    reading the 50 echoes, back to back."""
    burst = b"GET /pipeline?x=1 HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\n\r\n" * 50

    async def client(reader, writer, deadline, tally):
        while now() < deadline:
            writer.write(burst)
            for _ in range(50):
                status, _ = await http_response(reader)
                tally[f"status {status}"] += 1

    return http_clients(args, deadline, args.count or (4 if args.quick else 8), client)


ATTACKS = {
    "flood-tcp": attack_flood_tcp,
    "flood-ws": attack_flood_ws,
    "qos2-unreleased": attack_qos2_unreleased,
    "many-filters": attack_many_filters,
    "hoarder": attack_hoarder,
    "long-filters": attack_long_filters,
    "long-client-ids": attack_long_client_ids,
    "topic-aliases": attack_topic_aliases,
    "distinct-topics": attack_distinct_topics,
    "wildcard-disconnect": attack_wildcard_disconnect,
    "takeover": attack_takeover,
    "admin-idle": attack_admin_idle,
    "crowd": attack_crowd,
    "http-stream": attack_http_stream,
    "http-drip": attack_http_drip,
    "http-pipeline": attack_http_pipeline,
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("attack", choices=sorted(ATTACKS) + ["list", "warmup"])
    p.add_argument("--mqtt", help="MQTT TCP address HOST:PORT")
    p.add_argument("--ws", help="WebSocket address HOST:PORT (MQTT over WebSocket at /mqtt)")
    p.add_argument("--admin", help="admin address HOST:PORT")
    p.add_argument("--healthcheck", help="command timed by admin-idle (default: GET /healthz by hand)")
    p.add_argument("--quick", action="store_true", help="the miniature sizes (CI)")
    p.add_argument("--duration", type=float, default=None, help="seconds present (default 3 quick, 30 full)")
    p.add_argument("--count", type=int, default=0, help="override the attack's main count")
    args = p.parse_args()
    if args.attack == "list":
        print("\n".join(ATTACKS))
        return
    duration = args.duration or (3.0 if args.quick else 30.0)
    signal.signal(signal.SIGTERM, on_sigterm)
    start = time.monotonic()
    deadline = start + duration
    try:
        out = (warm_up if args.attack == "warmup" else ATTACKS[args.attack])(args, deadline)
    except (OSError, ConnectionError) as e:
        out = {"error": f"{type(e).__name__}: {e}"}
    out = {"attack": args.attack, "quick": args.quick, "secs": round(time.monotonic() - start, 2),
           **({"stopped_early": True} if STOPPED else {}), **out}
    print(json.dumps(out, separators=(",", ":")), flush=True)
    # Now, without waiting on reader threads still blocked in the kernel
    # (interpreter shutdown can take seconds with hundreds of them).
    os._exit(0)


if __name__ == "__main__":
    main()
