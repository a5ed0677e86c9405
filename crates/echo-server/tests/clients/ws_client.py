"""Round trip against echo-server with the Python `websockets` library.

Usage: python3 ws_client.py ws://HOST:PORT/
       python3 ws_client.py wss://HOST:PORT/ CERT.pem   (trusting only CERT.pem)
Exits 0 when every check passes; prints what failed otherwise.
"""
import asyncio
import os
import ssl
import sys

import websockets


async def main(url: str, cafile: str | None) -> None:
    tls = ssl.create_default_context(cafile=cafile) if cafile else None
    async with websockets.connect(url, subprotocols=["echo.v1", "other"], max_size=None, ssl=tls) as ws:
        assert ws.subprotocol == "echo.v1", f"subprotocol {ws.subprotocol!r}"
        for message in ["hello from python", "ünïcödé ✓", "", os.urandom(1000), b"", os.urandom(300_000)]:
            await ws.send(message)
            echo = await ws.recv()
            assert echo == message, f"echo mismatch for a {type(message).__name__} of {len(message)}"
        # A fragmented message (websockets sends each chunk as a frame).
        await ws.send(["frag", "men", "ted"])
        assert await ws.recv() == "fragmented"
        latency = await (await ws.ping(b"py"))
        assert latency >= 0
        # Many in flight: order preserved.
        for i in range(200):
            await ws.send(f"n{i}")
        for i in range(200):
            assert await ws.recv() == f"n{i}"
        await ws.close(code=4000, reason="python done")
    assert ws.close_code == 4000, f"close code {ws.close_code}"
    print(f"python websockets {websockets.__version__}: ok")


asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
