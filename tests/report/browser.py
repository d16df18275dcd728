"""Open a page in headless Chromium through the DevTools protocol and report what it saw.

Debian's ``chromium`` (CI installs it; see .ci/run), driven with ``websocket-client``:
no browser download, no Selenium/Playwright. :func:`inspect_page` loads a file, waits
for the load event and returns the images (natural sizes), table count, console /
log errors, uncaught exceptions and every URL the page requested, plus a screenshot.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from itertools import count
from pathlib import Path
from typing import Any

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--remote-debugging-port=0", "--window-size=1280,900"]
CHECK_JS = """(() => ({
  images: [...document.images].map(i => ({src: i.src.slice(0, 22), complete: i.complete,
                                           width: i.naturalWidth, height: i.naturalHeight})),
  tables: document.querySelectorAll("table").length,
  headings: [...document.querySelectorAll("h2")].map(h => h.textContent),
  height: document.documentElement.scrollHeight,
}))()"""


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def inspect_page(page: Path, profile: Path, screenshot: Path | None = None,
                 timeout: float = 60.0) -> dict[str, Any]:
    import websocket  # websocket-client, a test dependency

    exe = chromium()
    if exe is None:
        raise FileNotFoundError("no chromium on PATH")
    profile.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": "disabled:"})
    deadline = time.monotonic() + timeout
    try:
        port_file = profile / "DevToolsActivePort"
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {proc.returncode} at start")
            if time.monotonic() > deadline:
                raise TimeoutError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            targets = json.load(r)
        target = next(t for t in targets if t.get("type") == "page")
        ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=timeout,
                                         suppress_origin=True)
        try:
            return _drive(ws, page, screenshot, deadline)
        finally:
            ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _drive(ws, page: Path, screenshot: Path | None, deadline: float) -> dict[str, Any]:
    ids = count(1)
    events: list[dict] = []

    def receive() -> dict:
        if time.monotonic() > deadline:
            raise TimeoutError("chromium did not answer in time")
        return json.loads(ws.recv())

    def send(method: str, **params) -> dict:
        call = next(ids)
        ws.send(json.dumps({"id": call, "method": method, "params": params}))
        while True:
            msg = receive()
            if msg.get("id") == call:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            events.append(msg)

    for domain in ("Page", "Runtime", "Log", "Network"):
        send(f"{domain}.enable")
    send("Page.navigate", url=page.resolve().as_uri())
    while not any(e.get("method") == "Page.loadEventFired" for e in events):
        events.append(receive())
    result = send("Runtime.evaluate", expression=CHECK_JS, returnByValue=True)
    info = result["result"]["value"]
    if screenshot is not None:
        send("Emulation.setDeviceMetricsOverride", width=1280,
             height=min(int(info["height"]), 16000), deviceScaleFactor=1, mobile=False)
        shot = send("Page.captureScreenshot", format="png")
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    send("Runtime.evaluate", expression="1")  # collect events that arrived meanwhile
    info["console_errors"] = [
        " ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"])
        for e in events if e.get("method") == "Runtime.consoleAPICalled"
        and e["params"]["type"] in ("error", "assert")]
    info["console_errors"] += [
        e["params"]["entry"].get("text", "") for e in events
        if e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"]
    info["exceptions"] = [e["params"]["exceptionDetails"].get("text", "") for e in events
                          if e.get("method") == "Runtime.exceptionThrown"]
    info["requests"] = [e["params"]["request"]["url"][:40] for e in events
                        if e.get("method") == "Network.requestWillBeSent"]
    return info
