"""A headless Chromium the tests drive as a user would, through the DevTools protocol (aiohttp's websocket client,
already installed with Ray): open a URL, wait for what the page shows, click an element with the mouse (at its
centre, as a user's click lands), read the page's text, take a screenshot. One fresh profile per Browser: nothing
remembered from an earlier visit (such as MLflow's stored choice of view) unless the test put it there."""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import signal
import subprocess
import time
from pathlib import Path


class Browser:
    def __init__(self, chromium: str, profile: Path, width: int = 1500, height: int = 950):
        profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", f"--window-size={width},{height}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.loop = asyncio.new_event_loop()
        self.ids = itertools.count(1)
        try:
            port = self._port(profile / "DevToolsActivePort")
            self.loop.run_until_complete(self._connect(port))
            self.call("Emulation.setDeviceMetricsOverride",
                      width=width, height=height, deviceScaleFactor=1, mobile=False)
            self.call("Page.enable")
        except BaseException:
            self.close()
            raise

    def _port(self, active: Path, timeout: float = 30) -> int:
        t0 = time.monotonic()
        while time.monotonic() < t0 + timeout:
            if active.exists() and active.read_text().strip():
                return int(active.read_text().split()[0])
            assert self.proc.poll() is None, f"chromium exited {self.proc.returncode}"
            time.sleep(0.1)
        raise TimeoutError("chromium did not open its DevTools port")

    async def _connect(self, port: int) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in await r.json(content_type=None) if t["type"] == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 << 20)

    async def _call(self, method: str, params: dict) -> dict:
        i = next(self.ids)
        await self.ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive(timeout=60)).data)
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def call(self, method: str, **params) -> dict:
        return self.loop.run_until_complete(self._call(method, params))

    def eval(self, js: str):
        r = self.call("Runtime.evaluate", expression=js, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{js[:80]}…: {r['exceptionDetails'].get('text')}")
        return r["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait(self, js: str, what: str, timeout: float = 60):
        """Wait until the expression `js` is truthy on the page; returns its value."""
        t0 = time.monotonic()
        while time.monotonic() < t0 + timeout:
            try:
                v = self.eval(js)
            except RuntimeError:
                v = None
            if v:
                return v
            time.sleep(0.25)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; the page says:\n"
                             f"{self.text()[:3000]}")

    def wait_text(self, needle: str, timeout: float = 60) -> None:
        self.wait(f"document.body && document.body.innerText.includes({json.dumps(needle)})", repr(needle), timeout)

    def text(self) -> str:
        return self.eval("document.body ? document.body.innerText : ''") or ""

    def url(self) -> str:
        return self.eval("location.href")

    def click(self, js_element: str, what: str, timeout: float = 60) -> None:
        """A mouse click at the centre of the element `js_element` (an expression) evaluates to, once it is there."""
        rect = self.wait(f"(() => {{ const el = {js_element}; if (!el) return null; el.scrollIntoView({{block: "
                         f"'center'}}); const r = el.getBoundingClientRect(); return r.width && r.height ? "
                         f"[r.x + r.width / 2, r.y + r.height / 2] : null; }})()", what, timeout)
        x, y = rect
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def click_text(self, text: str, selector: str = "a", timeout: float = 60) -> None:
        """Click the first `selector` element whose visible text is `text` (trimmed)."""
        self.click(f"[...document.querySelectorAll({json.dumps(selector)})].find(e => e.innerText.trim() === "
                   f"{json.dumps(text)})", f"{selector} {text!r}", timeout)

    def back(self) -> None:
        self.eval("history.back()")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def local_storage(self, key: str):
        return self.eval(f"localStorage.getItem({json.dumps(key)})")

    def close(self) -> None:
        try:
            if getattr(self, "session", None) is not None:
                self.loop.run_until_complete(self.session.close())
        finally:
            self.loop.close()
            if self.proc.poll() is None:  # our own process group only: chromium's zygote and renderers
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
