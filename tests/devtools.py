"""Headless Chromium driven over the DevTools protocol (a websocket; no Playwright, no downloaded browser): tabs,
keystrokes, script evaluation and the requests each tab sent. For the tests of pages the project serves."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from typing import Any, Dict, List, Optional

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)

# key -> (code, windowsVirtualKeyCode, text): what Input.dispatchKeyEvent needs to look like a real keystroke.
_SPECIAL = {"Enter": ("Enter", 13, "\r"), "Backspace": ("Backspace", 8, ""), "ArrowLeft": ("ArrowLeft", 37, ""),
            "ArrowUp": ("ArrowUp", 38, ""), "ArrowRight": ("ArrowRight", 39, ""), "ArrowDown": ("ArrowDown", 40, "")}


class DevToolsError(RuntimeError):
    pass


class Browser:
    """One headless Chromium process and its browser-level DevTools connection."""

    def __init__(self, user_dir: str, timeout: float = 60.0):
        import websocket  # websocket-client (the kubernetes client's dependency, in the test extras)

        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
             "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
             "--disable-backgrounding-occluded-windows", "--remote-debugging-port=0",
             f"--user-data-dir={user_dir}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        port_file = os.path.join(user_dir, "DevToolsActivePort")
        deadline = time.monotonic() + timeout
        while not (os.path.exists(port_file) and len(open(port_file).read().split()) >= 2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise DevToolsError(f"chromium did not open its DevTools port: {self.process.stderr.read()[-2000:]}")
            time.sleep(0.05)
        port, path = open(port_file).read().split()[:2]
        self._socket = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=timeout,
                                                   suppress_origin=True)
        self._next_id = 0
        self.events: List[dict] = []

    def send(self, method: str, params: Optional[dict] = None, session: Optional[str] = None) -> Dict[str, Any]:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._socket.send(json.dumps(message))
        while True:
            reply = json.loads(self._socket.recv())
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise DevToolsError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def new_tab(self, url: str) -> "Tab":
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        tab = Tab(self, session, target)
        tab.send("Network.enable")
        tab.send("Page.enable")
        tab.send("Page.navigate", {"url": url})
        return tab

    def close(self) -> None:
        try:
            self._socket.close()
        except Exception:
            pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


class Tab:
    """One page: evaluate script in it, type into it, list the requests it sent."""

    def __init__(self, browser: Browser, session: str, target: str):
        self.browser, self.session, self.target = browser, session, target

    def send(self, method: str, params: Optional[dict] = None) -> Dict[str, Any]:
        return self.browser.send(method, params, self.session)

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise DevToolsError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0, what: str = "") -> Any:
        """The value of `expression` once truthy (polled; an error until then counts as not yet)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except DevToolsError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {what or expression}")
            time.sleep(0.02)

    def press(self, key: str) -> None:
        """One keystroke (down and up) as a person's keyboard sends it."""
        if key in _SPECIAL:
            code, vk, text = _SPECIAL[key]
        else:
            code, vk, text = f"Key{key.upper()}", ord(key.upper()), key
        common = {"key": key, "code": code, "windowsVirtualKeyCode": vk, "nativeVirtualKeyCode": vk}
        self.send("Input.dispatchKeyEvent", {"type": "keyDown" if text else "rawKeyDown", "text": text, **common})
        self.send("Input.dispatchKeyEvent", {"type": "keyUp", **common})

    def reload(self) -> None:
        self.send("Page.reload", {"ignoreCache": False})

    def requests(self) -> List[dict]:
        """(method, url) of every request this tab sent so far."""
        return [e["params"]["request"] for e in self.browser.events
                if e.get("sessionId") == self.session and e["method"] == "Network.requestWillBeSent"]
