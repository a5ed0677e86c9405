"""Loads echo-server's page in headless Chromium and uses it as a person
would: waits for "connected", types a message, clicks Send, and reads the
echo and its round-trip time from the page. Drives Chromium through the
DevTools protocol with the `websockets` library (no other dependency).

With --sse, it instead opens an EventSource on /.sse from the loaded page
and reports the first three "time" events (their ids and data) and the
stream's opening "request" event.

Usage: python3 browser_echo.py CHROMIUM_BINARY http://HOST:PORT/.ws [--sse] [CHROMIUM_FLAG...]
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


async def drive(debug_port: int, page_url: str, sse: bool = False) -> dict:
    targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json/list"))
    page = next(t for t in targets if t["type"] == "page" and t["url"].startswith(page_url))
    async with websockets.connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
        p = Page(ws)
        await p.wait_for(f"location.href === {json.dumps(page_url)} && document.readyState === 'complete'")
        if sse:
            return await drive_sse(p)
        await p.wait_for("document.getElementById('status').textContent === 'connected'")
        text = f"browser says hi {os.getpid()}"
        await p.eval(f"document.getElementById('message').value = {json.dumps(text)}")
        await p.eval("document.getElementById('send').click()")
        rtt = await p.wait_for(
            "(() => { const li = [...document.querySelectorAll('li.echo')]"
            f".find(li => li.children[1].textContent === {json.dumps(text)});"
            " return li ? li.dataset.rttMs : null; })()")
        return {"echoed": text, "rtt_ms": float(rtt)}


def main() -> None:
    chromium, url = sys.argv[1], sys.argv[2]
    sse = "--sse" in sys.argv[3:]
    flags = [a for a in sys.argv[3:] if a.startswith("--") and a != "--sse"]
    profile = tempfile.mkdtemp(prefix="echo-chromium-")
    proc = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0", *flags, url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = wait_for_port_file(profile, proc)
        result = asyncio.run(asyncio.wait_for(drive(port, url, sse), 60))
        print(json.dumps(result))
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


main()
