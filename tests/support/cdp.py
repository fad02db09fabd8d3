"""A headless Chromium driven over the DevTools protocol with aiohttp (no browser-automation
dependency): start the system browser, open a page, evaluate JavaScript, take screenshots.

The browser is Debian's ``chromium`` package (``.ci/run`` installs it); ``find_chromium`` returns
None where it is absent so that tests can skip with a note.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

START_TIMEOUT = 60.0  # a loaded CI machine can take a while to start a browser
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--remote-debugging-port=0",
)  # fmt: skip


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


class Page:
    """One tab: ``call`` sends a DevTools command and returns its result."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        await self.ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            message = await self.ws.receive()
            if message.type is not aiohttp.WSMsgType.TEXT:
                raise ConnectionError(f"DevTools connection closed during {method}")
            data = json.loads(message.data)
            if data.get("id") == ident:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                result: dict[str, Any] = data["result"]
                return result

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (awaited if it is a promise)."""
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, within: float = 30.0) -> Any:
        """Poll ``expression`` until it is truthy (the page updates itself on a timer: there is
        no event of ours to wait on)."""
        async with asyncio.timeout(within):
            while not (value := await self.evaluate(expression)):  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        return value

    async def screenshot(self, path: Path, width: int) -> None:
        height = int(await self.evaluate("document.documentElement.scrollHeight"))
        await self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width, height=height, deviceScaleFactor=1, mobile=False,
        )  # fmt: skip
        shot = await self.call("Page.captureScreenshot", format="png")
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(path.write_bytes, base64.b64decode(shot["data"]))


@contextlib.asynccontextmanager
async def open_page(binary: str, profile: Path, width: int = 1400) -> AsyncIterator[Page]:
    """A fresh headless browser with one blank tab; killed (with its children) on exit."""
    process = await asyncio.create_subprocess_exec(
        binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},1000", "about:blank",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(START_TIMEOUT):
                while not port_file.exists() or not port_file.read_text().strip():
                    if process.returncode is not None:
                        raise RuntimeError(f"{binary} exited with {process.returncode}")
                    await asyncio.sleep(0.1)
                port = int(port_file.read_text().split()[0])
                while True:
                    async with http.get(f"http://127.0.0.1:{port}/json/list") as reply:
                        targets = [t for t in await reply.json() if t["type"] == "page"]
                    if targets:
                        break
                    await asyncio.sleep(0.1)
            async with http.ws_connect(targets[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                await page.call("Page.enable")
                await page.call(
                    "Emulation.setDeviceMetricsOverride",
                    width=width, height=1000, deviceScaleFactor=1, mobile=False,
                )  # fmt: skip
                yield page
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
