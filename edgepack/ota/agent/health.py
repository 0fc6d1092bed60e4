"""The health gate: start a bundle's server, wait for ``/readyz``, ask the golden prompt.

The server is started behind a small ``Launcher`` protocol; the real one runs
``edgepack serve BUNDLE --host 127.0.0.1 --port P`` as a child process that dies with the
agent (``PR_SET_PDEATHSIG``), so a kill -9 of the agent leaves no orphan holding the port.

Golden prompts come from the bundle manifest (``golden_prompts``): each is a mapping with
``prompt`` (a user message) or ``messages`` (a chat), and optionally ``expect`` (a string,
or a list of strings any one of which must appear, case-insensitive) and ``max_tokens``.
Without ``expect`` a non-empty answer passes.

Device side: standard library and urllib3 only.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import urllib3

from edgepack.errors import EdgepackError, RuntimeHealthError
from edgepack.ota.release import version_key


class ServerHandle(Protocol):
    @property
    def url(self) -> str: ...

    @property
    def pid(self) -> int: ...

    def alive(self) -> bool: ...

    def stop(self) -> None: ...


class Launcher(Protocol):
    def start(self, bundle: Path, port: int) -> ServerHandle: ...


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class ProcessHandle:
    proc: subprocess.Popen
    url: str
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def exit_detail(self) -> str:
        """How the process ended, with the server's own error line when its log has one
        (``edgepack serve`` prints ``error: ...`` before exiting 6 or 7)."""
        detail = f"exit status {self.proc.returncode}"
        if self.log_path is not None:
            try:
                lines = self.log_path.read_text(errors="replace").splitlines()
            except OSError:
                lines = []
            errors = [ln.strip() for ln in lines if ln.startswith("error:")]
            if errors:
                detail += f", {errors[-1][:300]}"
        return detail

    def stop(self, grace: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class SubprocessLauncher:
    """Runs ``ARGV... BUNDLE --host 127.0.0.1 --port P`` (default: ``edgepack serve``)."""

    def __init__(self, argv: Sequence[str] | None = None, *, log_dir: Path | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        self.argv = list(argv) if argv else [sys.executable, "-m", "edgepack", "serve"]
        self.log_dir = log_dir
        self.environ = dict(environ if environ is not None else os.environ)

    def start(self, bundle: Path, port: int) -> ProcessHandle:
        log: Any = subprocess.DEVNULL
        log_path = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"health-{bundle.name}.log"
            log = open(log_path, "wb")  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                [*self.argv, str(bundle), "--host", "127.0.0.1", "--port", str(port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.environ, preexec_fn=_die_with_parent,  # noqa: PLW1509
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        return ProcessHandle(proc, f"http://127.0.0.1:{port}", log_path)


def _golden(prompt: Mapping[str, Any]) -> tuple[list[dict[str, str]], list[str], int]:
    if "messages" in prompt:
        messages = list(prompt["messages"])
    else:
        messages = [{"role": "user", "content": str(prompt.get("prompt", ""))}]
    expect = prompt.get("expect", prompt.get("contains", []))
    expected = [expect] if isinstance(expect, str) else [str(e) for e in expect or []]
    # 48 tokens, as the build's validation answers it (edgepack/validate.py), so a bundle
    # that passed there is judged on the same answer here.
    return messages, expected, int(prompt.get("max_tokens", 48))


def check_server(handle: ServerHandle, manifest: Mapping[str, Any], window: float,
                 api_key: str | None = None) -> dict[str, Any]:
    """Wait up to ``window`` s for ``/readyz`` 200, then ask each golden prompt.

    Returns what readyz reported. Raises RuntimeHealthError naming what failed: the process
    exited, readiness never came, or an answer missed its expected text.
    """
    http = urllib3.PoolManager(retries=False)
    deadline = time.monotonic() + window
    ready: dict[str, Any] | None = None
    last = "no answer"
    while time.monotonic() < deadline:
        if not handle.alive():
            how = getattr(handle, "exit_detail", None)
            raise RuntimeHealthError(f"the server exited before it was ready ({last}"
                                     + (f"; {how()})" if how is not None else ")"))
        try:
            r = http.request("GET", f"{handle.url}/readyz", timeout=urllib3.Timeout(2.0))
            last = f"readyz {r.status}"
            if r.status == 200:
                ready = json.loads(r.data or b"{}")
                break
        except (urllib3.exceptions.HTTPError, ValueError) as e:
            last = type(e).__name__
        time.sleep(0.2)
    if ready is None:
        raise RuntimeHealthError(f"the server was not ready within {window:g} s ({last})")
    _check_identity(ready, manifest)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    model_kind = (manifest.get("model") or {}).get("kind", "chat")
    for prompt in manifest.get("golden_prompts") or []:
        if model_kind == "embedding":
            break  # embedding bundles are judged by readiness (their warm-up embeds)
        messages, expected, max_tokens = _golden(prompt)
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeHealthError(f"no time left in the {window:g} s window for the "
                                     "golden prompt")
        # OpenAI's API requires the model's name; the server names it in /readyz.
        body = {"model": ready.get("model") or (manifest.get("model") or {}).get("name"),
                "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        try:
            r = http.request("POST", f"{handle.url}/v1/chat/completions",
                             body=json.dumps(body).encode(), headers=headers,
                             timeout=urllib3.Timeout(left))
        except urllib3.exceptions.HTTPError as e:
            raise RuntimeHealthError(f"the golden prompt got no answer: {e}") from e
        if r.status != 200:
            raise RuntimeHealthError(f"the golden prompt got HTTP {r.status}: "
                                     f"{_error_text(r.data)}")
        try:
            answer = json.loads(r.data)["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise RuntimeHealthError(f"the golden prompt got an answer that is not a chat "
                                     f"completion: {r.data[:200]!r}") from e
        if not answer.strip():
            raise RuntimeHealthError("the golden prompt got an empty answer")
        if expected and not any(e.lower() in answer.lower() for e in expected):
            raise RuntimeHealthError(
                f"golden prompt answered {answer[:80]!r}, expected one of {expected}"
            )
    return ready


def _error_text(data: bytes) -> str:
    """The message of an OpenAI-shaped error body, else the start of the body."""
    try:
        return str(json.loads(data)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return repr(data[:200])


def _check_identity(ready: Mapping[str, Any], manifest: Mapping[str, Any]) -> None:
    """The server must serve the bundle being gated: after a restart through the service
    manager the old process may still answer (a restart that did not take, a wrong unit).
    Only what ``/readyz`` reports is compared (the real server reports both)."""
    want_sha = (manifest.get("model") or {}).get("sha256")
    got_sha = ready.get("sha256")
    if want_sha and got_sha and got_sha != want_sha:
        raise RuntimeHealthError(f"the server serves model sha256 {str(got_sha)[:16]}…, "
                                 f"expected {want_sha[:16]}…")
    want_v = (manifest.get("bundle") or {}).get("version")
    got_v = ready.get("bundle_version")
    if want_v is not None and got_v is not None:
        try:
            same = version_key(got_v) == version_key(want_v)
        except EdgepackError:  # a malformed version is a mismatch
            same = False
        if not same:
            raise RuntimeHealthError(f"the server serves bundle version {got_v!r}, "
                                     f"expected {want_v!r}")


def gate(launcher: Launcher, bundle: Path, manifest: Mapping[str, Any], window: float,
         on_start=None, api_key: str | None = None) -> dict[str, Any]:
    """Start ``bundle`` side by side on a free port, check it, always stop it."""
    handle = launcher.start(bundle, free_port())
    try:
        if on_start is not None:
            on_start(handle)
        return check_server(handle, manifest, window, api_key=api_key)
    finally:
        handle.stop()
