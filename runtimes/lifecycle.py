"""The server's life: load in the background, warm up, serve, drain; tell systemd.

``/readyz`` tells the truth from ``Lifecycle.phase``: "loading" until the engine has loaded
*and* one warm-up inference passed, "ready", then "draining" after SIGTERM or "broken" when
the engine failed. ``/healthz`` stays 200 throughout: the process answers.

systemd integration uses the plain notify protocol (a datagram to ``$NOTIFY_SOCKET``), so
no systemd Python package is needed: ``READY=1`` after warm-up, ``WATCHDOG=1`` every half
``$WATCHDOG_USEC`` while the event loop runs and the engine is not broken (a hung loop or a
broken engine stops the pings and systemd restarts the unit), ``STOPPING=1`` on drain.
Protocol: https://www.freedesktop.org/software/systemd/man/latest/sd_notify.html
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from edgepack.runtimes.engine import Engine, ModelInfo
from edgepack.runtimes.worker import EngineWorker

from edgepack.errors import EdgepackError

log = logging.getLogger("edgepack.serve")

LOADING, READY, DRAINING, BROKEN = "loading", "ready", "draining", "broken"


def sd_notify(message: str, environ: Mapping[str, str]) -> bool:
    """Send one notify datagram when ``NOTIFY_SOCKET`` is set; return whether it was sent."""
    path = environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            # Never block the event loop on a reader that does not keep up.
            s.setblocking(False)
            s.connect(path)
            s.send(message.encode())
    except BlockingIOError:
        log.debug("sd_notify(%s): the receiver's queue is full; dropped", message)
        return False
    except OSError as e:
        log.warning("sd_notify(%s) to %r failed: %s", message.split("\n")[0], path, e)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec), or None when not asked."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(0.05, int(usec) / 2e6)
    except ValueError:
        return None


class Lifecycle:
    """One model's phase and the background load that changes it.

    systemd hears about the server as a whole (``runtimes/models.py``, ``ModelSet``): it is
    ready when every model is, and the watchdog stops when any engine broke.
    """

    def __init__(
        self,
        engine: Engine,
        worker: EngineWorker,
        load_delay_seconds: float = 0.0,
        on_phase: Callable[[str], None] | None = None,
        name: str = "",
    ) -> None:
        self.engine = engine
        self.worker = worker
        self.name = name
        self.phase = LOADING
        self.error: str = ""
        self.error_exc: BaseException | None = None
        self.model: ModelInfo | None = None
        self.loaded_at = 0.0
        self._load_delay = load_delay_seconds
        self._on_phase = on_phase
        self._task: asyncio.Task[Any] | None = None
        self.failed = asyncio.Event()

    def _set(self, phase: str) -> None:
        self.phase = phase
        if self._on_phase:
            self._on_phase(phase)

    def start(self) -> None:
        """Begin loading in the background (the HTTP server answers meanwhile)."""
        self._task = asyncio.create_task(self._load(), name=f"edgepack-load {self.name}")

    async def _load(self) -> None:
        t0 = time.monotonic()
        try:
            if self._load_delay:
                await asyncio.sleep(self._load_delay)
            self.model = await self.worker.submit(self.engine.load)
            await self.worker.submit(self.engine.warm_up)
        except Exception as e:  # noqa: BLE001 - recorded, reported by /readyz and the runner
            self.mark_broken(e)
            return
        self.loaded_at = time.monotonic() - t0
        if self.phase == LOADING:
            log.info("%s loaded and warmed up in %.2f s; ready", self.name or "model",
                     self.loaded_at)
            self._set(READY)

    def mark_broken(self, e: BaseException) -> None:
        """The engine failed: readiness 503 from now on."""
        self.error = e.render() if isinstance(e, EdgepackError) else f"{type(e).__name__}: {e}"
        self.error_exc = e
        log.error("engine failed%s: %s", f" ({self.name})" if self.name else "", self.error)
        if self.phase != DRAINING:
            self._set(BROKEN)
        self.failed.set()

    def begin_drain(self) -> None:
        """SIGTERM: readiness goes 503 and new generation requests are refused."""
        if self.phase != DRAINING:
            self._set(DRAINING)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
