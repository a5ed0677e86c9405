"""One MQTT round trip with Eclipse paho-mqtt (2.x), as a user would write it.

    python3 paho_round_trip.py HOST PORT VERSION TRANSPORT

VERSION is "3.1.1" or "5"; TRANSPORT is "tcp" or "websockets" (then the
broker is reached at ws://HOST:PORT/mqtt, as MQTT.js and paho JS do).
Subscribes to its own topic, publishes at QoS 0, 1 and 2, and checks each
message comes back once with its payload (and, on MQTT 5, its user
property). Exits 0 on success.
"""
import sys
import threading
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

host, port, version, transport = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
v5 = version == "5"
protocol = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
client_id = f"paho-{version}-{transport}-{uuid.uuid4().hex[:8]}"
topic = f"paho/{client_id}"

client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, transport=transport)
if transport == "websockets":
    client.ws_set_options(path="/mqtt")

subscribed = threading.Event()
received = []
done = threading.Event()


def on_connect(client, userdata, flags, reason_code, properties):
    if reason_code.is_failure:
        print(f"connect refused: {reason_code}", file=sys.stderr)
        sys.exit(1)
    client.subscribe(topic, qos=2)


def on_subscribe(client, userdata, mid, reason_codes, properties):
    subscribed.set()


def on_message(client, userdata, message):
    props = getattr(message, "properties", None)
    user = getattr(props, "UserProperty", None) if props else None
    received.append((message.payload, message.qos, user))
    if len(received) == 3:
        done.set()


client.on_connect = on_connect
client.on_subscribe = on_subscribe
client.on_message = on_message
client.connect(host, port, keepalive=30)
client.loop_start()
if not subscribed.wait(10):
    print("no SUBACK", file=sys.stderr)
    sys.exit(1)
for qos in (0, 1, 2):
    properties = None
    if v5:
        properties = Properties(PacketTypes.PUBLISH)
        properties.UserProperty = [("qos", str(qos))]
    client.publish(topic, f"hello at qos {qos}".encode(), qos=qos, properties=properties)
if not done.wait(10):
    print(f"only {len(received)} of 3 messages came back: {received}", file=sys.stderr)
    sys.exit(1)
client.disconnect()
client.loop_stop()
payloads = sorted(p for p, _, _ in received)
assert payloads == [b"hello at qos 0", b"hello at qos 1", b"hello at qos 2"], payloads
if v5:
    assert all(user and user[0][0] == "qos" for _, _, user in received), received
print(f"ok: {version} over {transport}: {len(received)} messages")
