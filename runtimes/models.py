"""Several bundles in one server: one ``ModelState`` per bundle, routed by ``model``.

``edgepack serve A B`` loads each bundle as one server would (its own engine, worker thread,
admission queue and lifecycle) and ``ModelSet.route`` picks the one a request names. A name
the server does not serve is a 404 ``model_not_found`` in OpenAI's shape, with one bundle as
with several: never a silent fallback to a default model (STYLE.md).

The server as a whole is what systemd and ``/readyz`` see: ready when every model loaded and
passed its warm-up (``READY=1`` then), broken when any engine failed (the watchdog pings
stop, systemd restarts the unit), draining after SIGTERM (``STOPPING=1``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgepack.runtimes.access_log import note_model
from edgepack.runtimes.config import ServerConfig, effective_config
from edgepack.runtimes.engine import CancelToken, Engine
from edgepack.runtimes.lifecycle import (
    BROKEN,
    DRAINING,
    LOADING,
    READY,
    Lifecycle,
    sd_notify,
    watchdog_interval,
)
from edgepack.runtimes.metrics import UNKNOWN_MODEL, ModelMetrics, ServerMetrics
from edgepack.runtimes.openai_schema import ApiError
from edgepack.runtimes.queue import Admission
from edgepack.runtimes.worker import EngineWorker

log = logging.getLogger("edgepack.serve")


@dataclass
class ModelState:
    """One loaded bundle: what a request handler needs once ``model`` picked it."""

    config: ServerConfig
    engine: Engine
    worker: EngineWorker
    lifecycle: Lifecycle
    metrics: ModelMetrics
    admission: Admission
    active: set[CancelToken] = field(default_factory=set)  # generations with a live client

    def status(self) -> dict[str, Any]:
        """This model's part of ``/readyz``."""
        lc, cfg = self.lifecycle, self.config
        body: dict[str, Any] = {"status": lc.phase, "model": cfg.model_name}
        if lc.phase == READY:
            body.update({
                # The digest of the bytes the engine loaded (hashed through the descriptor
                # it loads from, runtimes/serve.py), not a copy of the manifest's.
                "sha256": cfg.model_sha256, "quant": cfg.quant, "kind": cfg.model_kind,
                "bundle": cfg.bundle_name, "bundle_version": cfg.bundle_version,
                "n_ctx": lc.model.n_ctx if lc.model else cfg.n_ctx,
                "load_seconds": round(lc.loaded_at, 3), "compute": cfg.compute,
                "config": effective_config(cfg),
            })
        elif lc.phase == BROKEN:
            body["error"] = lc.error
        return body


def model_card(cfg: ServerConfig) -> dict[str, Any]:
    """One entry of ``GET /v1/models``."""
    return {"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "edgepack",
            "kind": cfg.model_kind, "quant": cfg.quant, "sha256": cfg.model_sha256}


class ModelSet:
    """The models of one server, in the order the bundles were named."""

    def __init__(self, models: Sequence[tuple[ServerConfig, Engine]], metrics: ServerMetrics,
                 environ: Mapping[str, str]) -> None:
        names = [cfg.model_name for cfg, _ in models]
        if not names:
            raise ValueError("a server needs at least one model")
        self._environ = environ
        self._metrics = metrics
        self._notified_ready = False
        self._watchdog: asyncio.Task[Any] | None = None
        self._by_name: dict[str, ModelState] = {}
        for cfg, engine in models:
            m = metrics.for_model(cfg.model_name)
            m.info.info({"name": cfg.model_name, "kind": cfg.model_kind, "quant": cfg.quant,
                         "sha256": cfg.model_sha256, "bundle_version": cfg.bundle_version})
            worker = EngineWorker()
            lc = Lifecycle(engine, worker, cfg.load_delay_seconds,
                           on_phase=lambda p, m=m: self._on_phase(m, p),
                           name=cfg.model_name)
            self._by_name[cfg.model_name] = ModelState(
                cfg, engine, worker, lc, m,
                Admission(cfg.queue_size, m, slots=getattr(engine, "slots", 1)))

    def __iter__(self) -> Iterator[ModelState]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    @property
    def first(self) -> ModelState:
        return next(iter(self._by_name.values()))

    def route(self, name: str) -> ModelState:
        """The model a request names; ApiError 404 ``model_not_found`` for any other name."""
        state = self._by_name.get(name)
        note_model(UNKNOWN_MODEL if state is None else name)  # the request metrics' label
        if state is None:
            served = ", ".join(repr(n) for n in self._by_name)
            raise ApiError(
                f"model {name!r} not found; this server serves {served} (see GET /v1/models)",
                status=404, param="model", code="model_not_found",
            )
        return state

    # -- the server's phase ------------------------------------------------------------

    @property
    def phase(self) -> str:
        """ready only when every model is; broken when any is; else draining or loading."""
        phases = [m.lifecycle.phase for m in self]
        if DRAINING in phases:
            return DRAINING
        if BROKEN in phases:
            return BROKEN
        return READY if all(p == READY for p in phases) else LOADING

    @property
    def in_system(self) -> int:
        """Requests admitted to any model and not yet finished."""
        return sum(m.admission.in_system for m in self)

    def load_failure(self) -> BaseException | None:
        """The error of a model that could not load (the server then exits 7), else None."""
        for m in self:
            if m.lifecycle.failed.is_set() and m.lifecycle.model is None:
                return m.lifecycle.error_exc
        return None

    def _on_phase(self, m: ModelMetrics, phase: str) -> None:
        m.ready.set(1 if phase == READY else 0)
        whole = self.phase
        self._metrics.ready.set(1 if whole == READY else 0)
        if whole == READY and not self._notified_ready:
            self._notified_ready = True
            log.info("every model is ready (%d)", len(self))
            sd_notify("READY=1\nSTATUS=ready", self._environ)
        elif phase == BROKEN:
            broken = next(s for s in self if s.lifecycle.phase == BROKEN).lifecycle
            sd_notify(f"STATUS=engine failed: {broken.error.splitlines()[0][:200]}",
                      self._environ)

    def start(self) -> None:
        """Load every model in the background; ping systemd's watchdog when it asks."""
        for m in self:
            m.lifecycle.start()
        interval = watchdog_interval(self._environ)
        if interval:
            self._watchdog = asyncio.create_task(self._watch(interval), name="edgepack-watchdog")

    async def _watch(self, interval: float) -> None:
        while True:
            if self.phase != BROKEN:
                sd_notify("WATCHDOG=1", self._environ)
            await asyncio.sleep(interval)

    def begin_drain(self) -> None:
        """SIGTERM: every model refuses new work; readiness goes 503."""
        if self.phase != DRAINING:
            sd_notify("STOPPING=1", self._environ)
        for m in self:
            m.lifecycle.begin_drain()

    def cancel_generations(self) -> None:
        """Stop every generation between two tokens (the drain deadline passed)."""
        for m in self:
            for token in list(m.active):
                token.cancel("shutdown")

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            try:
                await self._watchdog
            except asyncio.CancelledError:
                pass
        for m in self:
            await m.lifecycle.stop()

    def close(self) -> None:
        """Free every engine on its own thread (queued jobs finish first)."""
        for m in self:
            try:
                m.worker.call_blocking(m.engine.close)
            except Exception:  # noqa: BLE001 - shutting down; nothing to report to
                log.exception("closing the engine of %s failed", m.config.model_name)
            m.worker.close(timeout=5)
