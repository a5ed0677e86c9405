#!/usr/bin/env python3
"""The MQTT cluster over NATS (docs/mqtt.md, "Cluster"): what the bridge adds.

Starts a nats-server and two echo-servers (A and B) pointed at it, all on
loopback ports the OS picks; a subscriber on A (local) and one on B (remote)
subscribe to `lat/#`; a publisher on A publishes at a steady rate, each
payload its send time. Prints latency (p50, p99, max) and losses for the
local and the remote path, then a burst: as many publishes as fast as the
publisher can send them, and what each subscriber got.

    cargo build --release -p echo-server
    python3 loadtest/cluster-latency.py [--rate 2000] [--seconds 5] [--burst 50000]

Needs nats-server (Debian: nats-server) and paho-mqtt 2.x. Everything runs
on this machine, on 127.0.0.1.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import paho.mqtt.client as mqtt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start_nats():
    binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    proc = subprocess.Popen([binary, "-a", "127.0.0.1", "-p", "-1"], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        m = re.search(r"Listening for client connections on 127\.0\.0\.1:(\d+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, int(m.group(1))
    raise SystemExit("nats-server did not start")


def start_echo(binary, nats_port):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHO_") and k != "RUST_LOG"}
    env["ECHO_CLUSTER_NATS_URL"] = f"nats://127.0.0.1:{nats_port}"
    proc = subprocess.Popen(
        [binary, "--log-format", "json", "--ws-listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0",
         "--admin-listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE, text=True, env=env)
    mqtt_port = admin_port = None
    for line in proc.stderr:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("message") == "listening" and entry.get("protocol") == "mqtt":
            mqtt_port = int(entry["addr"].rsplit(":", 1)[1])
        if entry.get("message") == "listening" and entry.get("protocol") == "admin":
            admin_port = int(entry["addr"].rsplit(":", 1)[1])
        if entry.get("message") == "cluster: connected to NATS" and mqtt_port and admin_port:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, mqtt_port, admin_port
    raise SystemExit("echo-server did not start")


class Sub:
    def __init__(self, port, name):
        self.latencies = []
        self.burst = 0
        self.last = 0.0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name)
        self.client.on_message = self.on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("lat/#", 0)
        self.client.loop_start()

    def on_message(self, client, userdata, msg):
        now = time.perf_counter_ns()
        if msg.topic == "lat/x":
            self.latencies.append((now - int(msg.payload)) / 1e6)
        elif msg.topic == "lat/burst":
            self.burst += 1
            self.last = time.perf_counter()


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))] if values else float("nan")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default=os.path.join(ROOT, "target/release/echo-server"))
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--burst", type=int, default=50000)
    args = parser.parse_args()
    procs = []
    try:
        nats, nats_port = start_nats()
        procs.append(nats)
        a, a_port, a_admin = start_echo(args.binary, nats_port)
        procs.append(a)
        b, b_port, b_admin = start_echo(args.binary, nats_port)
        procs.append(b)
        local, remote = Sub(a_port, "local"), Sub(b_port, "remote")
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub")
        pub.connect("127.0.0.1", a_port)
        pub.loop_start()
        # Until the remote subscription has reached NATS.
        deadline = time.time() + 10
        while not remote.latencies and time.time() < deadline:
            pub.publish("lat/x", str(time.perf_counter_ns()))
            time.sleep(0.05)
        time.sleep(0.5)
        local.latencies.clear()
        remote.latencies.clear()
        count = int(args.rate * args.seconds)
        start = time.perf_counter()
        for i in range(count):
            due = start + i / args.rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pub.publish("lat/x", str(time.perf_counter_ns()))
        time.sleep(1)
        print(f"steady: {count} QoS 0 publishes at {args.rate}/s on A")
        for name, sub in (("local (A)", local), ("remote (B, through NATS)", remote)):
            lat = sub.latencies
            print(f"  {name:26} received {len(lat):6}  p50 {pct(lat, 50):6.3f} ms  p99 {pct(lat, 99):6.3f} ms"
                  f"  max {max(lat) if lat else float('nan'):7.3f} ms")
        start = time.perf_counter()
        for _ in range(args.burst):
            pub.publish("lat/burst", b"x" * 64)
        sent = time.perf_counter() - start
        time.sleep(2)
        print(f"burst: {args.burst} QoS 0 publishes of 64 bytes on A, sent in {sent:.2f} s"
              f" ({args.burst / sent:,.0f}/s)")
        for name, sub in (("local (A)", local), ("remote (B, through NATS)", remote)):
            print(f"  {name:26} received {sub.burst:6}  last {sub.last - start:.2f} s after the first send")
        # Where what was not received went: the bridge's drops, or the
        # broker's skips of a slow subscriber (its topic's log rotated).
        for name, port in (("A", a_admin), ("B", b_admin)):
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            wanted = [line for line in body.splitlines()
                      if line.startswith(("echo_cluster_dropped_total", "echo_cluster_messages_total",
                                          "echo_mqtt_slow_subscriber_skips_total"))]
            print(f"  {name}: " + ", ".join(wanted))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())
