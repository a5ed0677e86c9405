"""Loads echo-server's page in headless Chromium and uses it as a person
would: waits for "connected", types a message, clicks Send, and reads the
echo and its round-trip time from the page. Drives Chromium through the
DevTools protocol with the `websockets` library (no other dependency).

With --sse, it instead opens an EventSource on /.sse from the loaded page
and reports the first three "time" events (their ids and data) and the
stream's opening "request" event.

With --live N, after the echo it opens N WebSocket clients of its own that
echo as fast as they can, and reports what the page's live panel (fed by
/.stats) shows before, under that load, and after the clients left.

With --mqtt, it instead opens the page's MQTT tab (MQTT.js over WebSocket),
subscribes, publishes, and reports the message the page received.

Usage: python3 browser_echo.py CHROMIUM_BINARY http://HOST:PORT/.ws [--sse | --live N | --mqtt] [CHROMIUM_FLAG...]
(any other argument starting with -- goes to Chromium, e.g.
--ignore-certificate-errors for an https:// page with a self-signed certificate)
Prints a JSON line with the result; exits non-zero on failure.
"""
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import websockets


def wait_for_port_file(profile: str, proc: subprocess.Popen, timeout: float = 30) -> int:
    path = os.path.join(profile, "DevToolsActivePort")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"chromium exited early with {proc.returncode}")
        try:
            with open(path) as f:
                return int(f.readline().strip())
        except (FileNotFoundError, ValueError):
            time.sleep(0.1)
    raise SystemExit("chromium did not open its DevTools port")


class Page:
    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    async def call(self, method, **params):
        self.next_id += 1
        my_id = self.next_id
        await self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await self.ws.recv())
            if reply.get("id") == my_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    async def eval(self, expression):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression, timeout=15):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                value = await self.eval(expression)
            except RuntimeError:
                value = None  # the page may still be loading (or be about:blank)
            if value:
                return value
            await asyncio.sleep(0.05)
        raise SystemExit(f"timed out waiting for {expression}; page: "
                         + str(await self.eval("document.body ? document.body.innerText : location.href")))


SSE_SCRIPT = """
window.sse = {times: [], request: null, errors: 0};
const source = new EventSource('/.sse');
source.addEventListener('request', e => { window.sse.request = e.data; });
source.addEventListener('time', e => {
  window.sse.times.push({id: e.lastEventId, data: e.data});
  if (window.sse.times.length === 3) source.close();
});
source.onerror = () => { window.sse.errors += 1; };
"""


async def drive_sse(p: "Page") -> dict:
    await p.eval(SSE_SCRIPT)
    await p.wait_for("window.sse.times.length >= 3")
    return await p.eval("window.sse")


LIVE_FIGURES = """(() => {
  const n = (id) => Number(document.getElementById(id).textContent.replace(/[^0-9.]/g, ''));
  return {ws: n('ws-connections'), mqtt: n('mqtt-connections'), rate: n('messages-rate'),
          rss_mib: n('rss'), cpu: n('cpu'), shown: document.getElementById('ws-connections').textContent !== '\u2013'};
})()"""


async def figures(p: "Page", condition: str) -> dict:
    """Waits until the live panel's figures (as `f`) meet `condition`."""
    await p.wait_for(f"(f => f.shown && ({condition}))({LIVE_FIGURES})", timeout=20)
    return await p.eval(LIVE_FIGURES)


async def drive_live(p: "Page", ws_url: str, clients: int) -> dict:
    # The page's own echo socket is one of the connections.
    before = await figures(p, "f.ws >= 1")
    stop = asyncio.Event()

    async def echo_client():
        async with websockets.connect(ws_url) as ws:
            while not stop.is_set():
                await ws.send("load")
                await ws.recv()

    tasks = [asyncio.create_task(echo_client()) for _ in range(clients)]
    try:
        loaded = await figures(p, f"f.ws >= {before['ws'] + clients} && f.rate >= 100")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    after = await figures(p, f"f.ws <= {before['ws']} && f.rate < {loaded['rate']}")
    chart = await p.eval("(() => { const c = document.getElementById('chart'), d = c.getContext('2d')"
                         ".getImageData(0, 0, c.width, c.height).data;"
                         " let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n; })()")
    return {"before": before, "loaded": loaded, "after": after, "chart_pixels": chart}


async def drive_mqtt(p: "Page") -> dict:
    topic = f"page/{os.getpid()}"
    await p.eval("document.getElementById('tab-mqtt').click()")
    await p.wait_for("document.getElementById('mqtt-status').textContent === 'connected'")
    await p.eval(f"document.getElementById('mqtt-sub-topic').value = {json.dumps(topic + '/#')}")
    await p.eval("document.getElementById('mqtt-subscribe').click()")
    await p.wait_for("!!document.querySelector('#mqtt-log li.subscribed')")
    payload = f"from the page {os.getpid()}"
    await p.eval(f"document.getElementById('mqtt-pub-topic').value = {json.dumps(topic + '/x')}")
    await p.eval(f"document.getElementById('mqtt-pub-payload').value = {json.dumps(payload)}")
    await p.eval("document.getElementById('mqtt-publish').click()")
    got = await p.wait_for("(() => { const li = document.querySelector('#mqtt-log li.message');"
                           " return li ? {topic: li.dataset.topic, payload: li.dataset.payload} : null; })()")
    script = await p.eval("[...document.scripts].map(s => s.src).filter(Boolean)")
    return {"sent": {"topic": topic + "/x", "payload": payload}, "received": got, "scripts": script}


async def drive(debug_port: int, page_url: str, sse: bool = False, live: int = 0, mqtt: bool = False) -> dict:
    targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json/list"))
    page = next(t for t in targets if t["type"] == "page" and t["url"].startswith(page_url))
    async with websockets.connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
        p = Page(ws)
        await p.wait_for(f"location.href === {json.dumps(page_url)} && document.readyState === 'complete'")
        if sse:
            return await drive_sse(p)
        if mqtt:
            return await drive_mqtt(p)
        await p.wait_for("document.getElementById('status').textContent === 'connected'")
        text = f"browser says hi {os.getpid()}"
        await p.eval(f"document.getElementById('message').value = {json.dumps(text)}")
        await p.eval("document.getElementById('send').click()")
        rtt = await p.wait_for(
            "(() => { const li = [...document.querySelectorAll('li.echo')]"
            f".find(li => li.children[1].textContent === {json.dumps(text)});"
            " return li ? li.dataset.rttMs : null; })()")
        result = {"echoed": text, "rtt_ms": float(rtt)}
        if live:
            ws_url = page_url.replace("http://", "ws://", 1).split("/.ws")[0] + "/load"
            result["live"] = await drive_live(p, ws_url, live)
        return result


def main() -> None:
    chromium, url = sys.argv[1], sys.argv[2]
    args = sys.argv[3:]
    sse, mqtt = "--sse" in args, "--mqtt" in args
    live = int(args[args.index("--live") + 1]) if "--live" in args else 0
    ours = {"--sse", "--mqtt", "--live"}
    flags = [a for a in args if a.startswith("--") and a not in ours]
    profile = tempfile.mkdtemp(prefix="echo-chromium-")
    proc = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0", *flags, url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = wait_for_port_file(profile, proc)
        result = asyncio.run(asyncio.wait_for(drive(port, url, sse, live, mqtt), 90))
        print(json.dumps(result))
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


main()
