"""Start ``edgepack serve BUNDLE`` in a child process on 127.0.0.1 and a free port.

For ``edgepack chat BUNDLE`` and :func:`edgepack.api.serve`: the same server a device runs,
verified against its manifest, started the same way; stopped with SIGTERM (it drains).
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from edgepack.client import ServerClient
from edgepack.errors import RuntimeHealthError


class LocalServer:
    """A running child server: ``url``, ``client``, ``stop()``; a context manager."""

    def __init__(self, bundle: Path, api_key: str | None = None,
                 args: Sequence[str] = ()) -> None:
        self.bundle = Path(bundle)
        self.api_key = api_key
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        env = dict(os.environ)
        if api_key:
            env["EDGEPACK_API_KEY"] = api_key
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgepack", "serve", str(self.bundle), "--host", "127.0.0.1",
             "--port", "0", "--log-level", "warning", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log, env=env,
        )
        self.url = ""

    def log_tail(self, limit: int = 3000) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-limit:]

    def _failed(self, what: str) -> RuntimeHealthError:
        tail = self.log_tail()
        self.stop()
        return RuntimeHealthError(f"the server for {self.bundle} {what}\n{tail}".rstrip(),
                                  hint="run `edgepack serve BUNDLE` to see it start")

    def wait_listening(self, timeout: float = 60) -> str:
        """Read the server's 'listening on http://...' line; return the URL."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline(4096).decode(errors="replace") if ready else ""
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not m:
            raise self._failed("did not start listening")
        self.url = f"http://127.0.0.1:{m.group(1)}"
        return self.url

    def wait_ready(self, timeout: float = 600,
                   tick: Callable[[], None] = lambda: None) -> dict:
        """Poll /readyz until the model has loaded and warmed up; its JSON."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._failed(f"exited with {self.proc.returncode} while loading")
            status = self.client.ready()
            if status is not None:
                return status
            tick()
            time.sleep(0.1)
        raise self._failed(f"was not ready after {timeout:.0f} s")

    @property
    def client(self) -> ServerClient:
        return ServerClient(self.url, api_key=self.api_key)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
