"""A real browser for tests: headless Chromium (Debian's `chromium` package), driven over the
DevTools protocol with aiohttp's websocket client (aiohttp comes with ray[default]).

MLflow's UI is a JavaScript app that fetches and draws after the page loads, so a test opens a page
and waits, in real time, until a JavaScript expression of its own says the page shows what it
checks; `--dump-dom` after a virtual-time budget returned charts still loading.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Until `url` answers 200 (or `proc` exits, or `timeout` passes: AssertionError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")


class Chromium:
    """One headless Chromium with a page, for `with Chromium() as browser: browser.wait_for(...)`."""

    def __init__(self, width: int = 1400, height: int = 1600):
        self.size = (width, height)
        self.profile = tempfile.mkdtemp(prefix="lesa-chromium-")
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Chromium":
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={self.profile}", f"--remote-debugging-port={self.port}",
             f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{self.port}/json/version", 60, self.proc)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)

    def page_socket(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as response:
            pages = [t for t in json.load(response) if t["type"] == "page"]
        return pages[0]["webSocketDebuggerUrl"]

    def wait_for(self, url: str | None, check: str, timeout: float = 120, screenshot: Path | None = None) -> dict:
        """Open `url` (None: stay on the page) and evaluate the JavaScript expression `check` (an object with a boolean
        `ready`) every second until `ready` or `timeout`; the last value. A PNG of the page goes
        to `screenshot` if given (evidence when a check fails)."""
        return asyncio.run(self._wait_for(url, check, timeout, screenshot))

    async def _wait_for(self, url: str | None, check: str, timeout: float, screenshot: Path | None) -> dict:
        import aiohttp

        ids = itertools.count(1)
        async with aiohttp.ClientSession() as session, session.ws_connect(self.page_socket(), max_msg_size=0) as ws:

            async def call(method: str, **params) -> dict:
                request = next(ids)
                await ws.send_json({"id": request, "method": method, "params": params})
                async for message in ws:
                    reply = json.loads(message.data)
                    if reply.get("id") == request:
                        if "error" in reply:
                            raise AssertionError(f"DevTools {method}: {reply['error']}")
                        return reply["result"]
                raise AssertionError("Chromium closed the DevTools connection")

            if url is not None:
                await call("Page.navigate", url=url)
            deadline, value = time.monotonic() + timeout, {}
            while time.monotonic() < deadline:
                result = await call("Runtime.evaluate", expression=f"({check})", returnByValue=True)
                value = result["result"].get("value") or {}
                if value.get("ready"):
                    break
                await asyncio.sleep(1)
            if screenshot is not None:
                shot = await call("Page.captureScreenshot", format="png")
                import base64

                screenshot.write_bytes(base64.b64decode(shot["data"]))
            return value
