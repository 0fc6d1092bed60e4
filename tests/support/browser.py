"""A real headless Chromium driven over the DevTools protocol (stdlib only).

Chromium is started with ``--remote-debugging-pipe``: it reads JSON commands, each ended by a
NUL byte, on fd 3 and writes replies and events on fd 4 (the protocol is documented at
https://chromedevtools.github.io/devtools-protocol/). One page target, flat sessions. The
browser answers HTTP authentication challenges with the credentials given (as a user would
type them into the browser's dialog) and records the URL of every request the page makes.
"""

from __future__ import annotations

import base64
import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any


class BrowserError(RuntimeError):
    pass


class Chromium:
    def __init__(self, exe: str, profile_dir: Path, credentials: tuple[str, str] | None = None,
                 size: tuple[int, int] = (1100, 820)) -> None:
        self.credentials = credentials
        profile_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(profile_dir.parent / "chromium.log", "wb")  # noqa: SIM115 - closed in close()
        self.requests: list[str] = []
        self.auth_challenges = 0
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def wire() -> None:  # in the child: fd 3 = commands in, fd 4 = replies out
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--remote-debugging-pipe", "--no-first-run",
             "--no-default-browser-check", "--disable-gpu", "--disable-extensions",
             "--disable-background-networking", "--disable-sync", "--no-sandbox",
             # Nothing but loopback resolves: the page must need nothing from outside.
             "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
             f"--window-size={size[0]},{size[1]}", f"--user-data-dir={profile_dir}",
             "about:blank"],
            pass_fds=(3, 4), preexec_fn=wire, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=self._log,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        self.page("Page.enable")
        self.page("Runtime.enable")
        self.page("Fetch.enable", handleAuthRequests=True)

    # -- the pipe ----------------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        os.write(self._to_child, json.dumps(message).encode() + b"\0")

    def _read(self, timeout: float) -> dict[str, Any] | None:
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._from_child], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(self._from_child, 1 << 20)
            if not chunk:
                raise BrowserError(f"chromium exited ({self.proc.poll()})")
            self._buf += chunk
        raw, _, self._buf = self._buf.partition(b"\0")
        return dict(json.loads(raw))

    def _handle_event(self, msg: dict[str, Any]) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Fetch.requestPaused":
            self.requests.append(params["request"]["url"])
            self._send({"id": self._new_id(), "method": "Fetch.continueRequest",
                        "sessionId": self.session, "params": {"requestId": params["requestId"]}})
        elif method == "Fetch.authRequired":
            self.auth_challenges += 1
            response: dict[str, Any] = {"response": "CancelAuth"}
            if self.credentials is not None:
                user, password = self.credentials
                response = {"response": "ProvideCredentials", "username": user,
                            "password": password}
            self._send({"id": self._new_id(), "method": "Fetch.continueWithAuth",
                        "sessionId": self.session,
                        "params": {"requestId": params["requestId"],
                                   "authChallengeResponse": response}})
        else:
            self._events.append(msg)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def call(self, method: str, session: str | None = None, timeout: float = 30,
             **params: Any) -> dict[str, Any]:
        mid = self._new_id()
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self._send(msg)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self._read(max(0.0, deadline - time.monotonic()))
            if reply is None:
                break
            if reply.get("id") == mid:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))
            if "method" in reply:
                self._handle_event(reply)
        raise BrowserError(f"{method}: no reply in {timeout} s")

    def page(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        return self.call(method, session=self.session, timeout=timeout, **params)

    # -- what a test does ---------------------------------------------------------------------

    def open(self, url: str, timeout: float = 30) -> None:
        """Navigate and wait for the load event."""
        self._events.clear()
        self.page("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e.get("method") == "Page.loadEventFired" for e in self._events):
                return
            msg = self._read(0.2)
            if msg is not None and "method" in msg:
                self._handle_event(msg)
        raise BrowserError(f"{url} did not load in {timeout} s")

    def evaluate(self, expression: str) -> Any:
        r = self.page("Runtime.evaluate", expression=expression, returnByValue=True,
                      awaitPromise=True)
        if "exceptionDetails" in r:
            raise BrowserError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def type_text(self, text: str) -> None:
        """Type into the focused element, then press Enter, as a user would."""
        self.page("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.page("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                      windowsVirtualKeyCode=13, **({"text": "\r"} if kind == "keyDown" else {}))

    def wait_for(self, expression: str, timeout: float = 120) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            msg = self._read(0.2)
            if msg is not None and "method" in msg:
                self._handle_event(msg)
        raise BrowserError(f"waited {timeout} s for {expression}")

    def screenshot(self, path: Path) -> Path:
        data = self.page("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (BrowserError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
