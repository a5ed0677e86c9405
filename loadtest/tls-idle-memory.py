"""Memory per idle WebSocket connection, plain (ws://) against TLS (wss://),
measured back to back on one build.

Starts the release server twice (plain, then with a fresh self-signed
certificate), opens N connections that each echo one message and then stay
idle, and reads the server's VmRSS and `echo_memory_heap_bytes` (admin
/metrics) before and after. echo-loadgen does not speak wss://, hence this.

Usage: python3 loadtest/tls-idle-memory.py [N] [SERVER_BINARY]
(default 2000, target/release/echo-server). Needs python3 `websockets`
and openssl. Prints one line per run and the difference per connection.
"""
import asyncio
import json
import os
import re
import resource
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

import websockets

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
BIN = sys.argv[2] if len(sys.argv) > 2 else "target/release/echo-server"


def self_signed(dir_):
    cert, key = os.path.join(dir_, "cert.pem"), os.path.join(dir_, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-days", "2", "-nodes", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-addext", "basicConstraints=critical,CA:FALSE", "-addext", "extendedKeyUsage=serverAuth",
         "-keyout", key, "-out", cert],
        check=True, stderr=subprocess.DEVNULL)
    return cert, key


def start(env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("ECHO_") and k != "RUST_LOG"}
    full.update(env)
    proc = subprocess.Popen(
        [BIN, "--log-format", "json", "--ws-listen", "127.0.0.1:0", "--no-mqtt",
         "--admin-listen", "127.0.0.1:0"],
        env=full, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    addrs = {}
    for line in proc.stderr:
        entry = json.loads(line)
        fields = entry.get("fields", entry)
        if fields.get("message") == "listening":
            addrs[fields["protocol"]] = fields["addr"]
        if fields.get("message") == "ready":
            break
    return proc, addrs


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) * 1024


def heap(admin):
    text = urllib.request.urlopen(f"http://{admin}/metrics").read().decode()
    return float(re.search(r"^echo_memory_heap_bytes (\S+)", text, re.M).group(1))


async def hold(url, tls, n):
    sockets = []
    for i in range(n):
        ws = await websockets.connect(url, ssl=tls, max_size=None, ping_interval=None)
        await ws.send(f"hello {i}")
        assert await ws.recv() == f"hello {i}"
        sockets.append(ws)
    await asyncio.sleep(2)  # every session back to quiet
    return sockets


async def measure(name, env, scheme, tls):
    proc, addrs = start(env)
    try:
        time.sleep(0.5)
        before = (rss(proc.pid), heap(addrs["admin"]))
        sockets = await hold(f"{scheme}://{addrs['websocket']}/", tls, N)
        after = (rss(proc.pid), heap(addrs["admin"]))
        per_rss = (after[0] - before[0]) / N
        per_heap = (after[1] - before[1]) / N
        print(f"{name}: {N} idle connections, RSS {before[0]} -> {after[0]} ({per_rss:.0f} B each), "
              f"heap {before[1]:.0f} -> {after[1]:.0f} ({per_heap:.0f} B each)", flush=True)
        for ws in sockets:
            await ws.close()
        return per_rss, per_heap
    finally:
        proc.terminate()
        proc.wait()


async def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, N + 512)), hard))
    with tempfile.TemporaryDirectory() as dir_:
        cert, key = self_signed(dir_)
        tls = ssl.create_default_context(cafile=cert)
        plain = await measure("plain ws://", {}, "ws", None)
        sealed = await measure(
            "TLS wss://", {"ECHO_WEBSOCKET_TLS_CERT": cert, "ECHO_WEBSOCKET_TLS_KEY": key}, "wss", tls)
    print(f"TLS costs {sealed[0] - plain[0]:.0f} B of RSS and {sealed[1] - plain[1]:.0f} B of heap "
          f"more per idle connection than plain")


asyncio.run(main())
