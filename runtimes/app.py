"""The Starlette application: routes, auth, body limits, metrics, lifespan.

``create_app(config, engine)`` builds one app; all state lives on ``app.state`` (set up in
the lifespan), none in module globals, so tests can run several apps in one process.

Routes (DESIGN.md): ``/healthz``, ``/readyz``, ``/metrics`` are open (no API key: probes and
Prometheus must reach them; they reveal the model name and counters, never prompts);
``/v1/*`` needs ``Authorization: Bearer KEY`` when an API key is configured.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from edgepack.runtimes import generation
from edgepack.runtimes.access_log import (
    ACCESS_LOGGER,
    REQUEST_ID_HEADER,
    access_record,
    begin_usage,
    request_id,
)
from edgepack.runtimes.config import ServerConfig, effective_config
from edgepack.runtimes.engine import CancelToken, Engine
from edgepack.runtimes.lifecycle import BROKEN, READY, Lifecycle
from edgepack.runtimes.metrics import ServerMetrics
from edgepack.runtimes.openai_schema import ApiError
from edgepack.runtimes.page import basic_password, status_page
from edgepack.runtimes.queue import Admission
from edgepack.runtimes.worker import EngineWorker
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("edgepack.serve")
access_log = logging.getLogger(ACCESS_LOGGER)

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


@dataclass
class ServerState:
    """Everything a request handler needs; one per app, on ``app.state.server``."""

    config: ServerConfig
    engine: Engine
    worker: EngineWorker
    lifecycle: Lifecycle
    metrics: ServerMetrics
    admission: Admission
    active: set[CancelToken] = field(default_factory=set)  # generations with a live client


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def state_of(request: Request) -> ServerState:
    return request.app.state.server  # type: ignore[no-any-return]


# -- open routes ---------------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    s = state_of(request)
    return JSONResponse({"status": "ok", "phase": s.lifecycle.phase})


async def readyz(request: Request) -> Response:
    s = state_of(request)
    lc, cfg = s.lifecycle, s.config
    if lc.phase == READY:
        return JSONResponse({
            "status": "ready",
            "model": cfg.model_name,
            "sha256": cfg.model_sha256,
            "quant": cfg.quant,
            "bundle": cfg.bundle_name,
            "bundle_version": cfg.bundle_version,
            "n_ctx": lc.model.n_ctx if lc.model else cfg.n_ctx,
            "load_seconds": round(lc.loaded_at, 3),
            # sha256 is the digest of the bytes the engine loaded (hashed through the
            # descriptor it loads from, runtimes/serve.py), not a copy of the manifest's.
            "compute": cfg.compute,
            "config": effective_config(cfg),
        })
    body: dict[str, Any] = {"status": lc.phase}
    if lc.phase == BROKEN:
        body["error"] = lc.error
    return JSONResponse(body, status_code=503)


async def metrics(request: Request) -> Response:
    s = state_of(request)
    s.metrics.ready.set(1 if s.lifecycle.phase == READY else 0)
    return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def list_models(request: Request) -> Response:
    s = state_of(request)
    return JSONResponse({"object": "list", "data": [_model_card(s.config)]})


async def get_model(request: Request) -> Response:
    s = state_of(request)
    name = request.path_params["model"]
    if name != s.config.model_name:
        raise ApiError(f"model {name!r} not found; this server serves {s.config.model_name!r}",
                       status=404, param="model", code="model_not_found")
    return JSONResponse(_model_card(s.config))


def _model_card(cfg: ServerConfig) -> dict[str, Any]:
    return {"id": cfg.model_name, "object": "model", "created": 0, "owned_by": "edgepack",
            "kind": cfg.model_kind, "quant": cfg.quant, "sha256": cfg.model_sha256}


# -- middleware ----------------------------------------------------------------------------


_CONVERTER = re.compile(r"\{(\w+):\w+\}")


def route_template(app: Any, scope: Scope) -> str:
    """The matched route's template (``/v1/models/{model}``), or "other".

    Metrics labels and log lines use this, never the raw path: a label per distinct path let
    anyone grow the registry without bound (issue #13).
    """
    for route in getattr(app, "routes", ()):
        match, _ = route.matches(scope)
        if match != Match.NONE:
            # "/v1/models/{model:path}" → "/v1/models/{model}": the converter is noise.
            return _CONVERTER.sub(r"{\1}", str(getattr(route, "path", "other")))
    return "other"


class GuardMiddleware:
    """API key for /v1/*, request id, request metrics by route template, the access log.

    Pure ASGI (streams pass through untouched).
    """

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        route = route_template(scope["app"], scope)
        rid = request_id(scope["headers"])
        usage = begin_usage()
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (REQUEST_ID_HEADER, rid.encode())]
            await send(message)

        try:
            if self.api_key and path not in OPEN_PATHS and not self._authorized(scope):
                err = ApiError(
                    "missing or wrong API key: send 'Authorization: Bearer <key>' with the key "
                    "the server was started with (--api-key / EDGEPACK_API_KEY)",
                    status=401, code="invalid_api_key",
                    # The status page asks a browser for the key (HTTP Basic, key as password).
                    headers={"WWW-Authenticate": 'Basic realm="edgepack", charset="UTF-8"'}
                    if path == "/" else None,
                )
                await error_response(err)(scope, receive, send_wrapper)
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            state: ServerState | None = getattr(scope["app"].state, "server", None)
            if state is not None:
                state.metrics.requests.labels(route, str(status["code"])).inc()
                state.metrics.latency.labels(route).observe(time.perf_counter() - t0)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info("request", extra={
                    "access": access_record(scope, route, status["code"], t0, rid, usage)})

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                assert self.api_key is not None
                if scheme.lower() == b"basic":  # a browser on the status page: user:KEY
                    token = basic_password(token.strip())
                elif scheme.lower() != b"bearer":
                    return False
                return hmac.compare_digest(token.strip(), self.api_key)
        return False


# -- errors --------------------------------------------------------------------------------


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    msg = (f"no route {request.method} {request.url.path}; see /v1/models, "
           "/v1/chat/completions, /v1/completions, /v1/embeddings, /healthz, /readyz, /metrics"
           if exc.status_code in (404, 405) else str(exc.detail))
    return error_response(ApiError(msg, status=exc.status_code, code=code,
                                   headers=exc.headers))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return error_response(ApiError(f"internal server error: {type(exc).__name__}",
                                   status=500, type="server_error", code="internal_error"))


# -- factory -------------------------------------------------------------------------------


def create_app(
    config: ServerConfig,
    engine: Engine,
    environ: Mapping[str, str] | None = None,
) -> Starlette:
    """Build the server app for ``engine`` (not yet loaded: the lifespan loads it)."""
    environ = dict(os.environ if environ is None else environ)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        m = ServerMetrics()
        m.model.info({"name": config.model_name, "kind": config.model_kind,
                      "quant": config.quant, "sha256": config.model_sha256,
                      "bundle_version": config.bundle_version})
        worker = EngineWorker()
        lc = Lifecycle(engine, worker, environ, config.load_delay_seconds,
                       on_phase=lambda p: m.ready.set(1 if p == READY else 0))
        app.state.server = ServerState(config, engine, worker, lc, m,
                                       Admission(config.queue_size, m,
                                                 slots=getattr(engine, "slots", 1)))
        lc.start()
        try:
            yield
        finally:
            lc.begin_drain()
            await lc.stop()
            # Past the drain deadline: whatever still runs is stopped between two tokens.
            for token in list(app.state.server.active):
                token.cancel("shutdown")
            # Queued jobs (if any) finish, then the engine is freed on its own thread.
            try:
                worker.call_blocking(engine.close)
            except Exception:  # noqa: BLE001 - shutting down; nothing to report to
                log.exception("closing the engine failed")
            worker.close(timeout=5)

    middleware = [Middleware(GuardMiddleware, api_key=config.api_key)]
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        middleware.insert(0, Middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                                        allow_methods=["GET", "POST"],
                                        allow_headers=["authorization", "content-type"]))
    routes = [
        Route("/", status_page, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", generation.chat_completions, methods=["POST"]),
        Route("/v1/completions", generation.completions, methods=["POST"]),
        Route("/v1/embeddings", generation.embeddings, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={ApiError: _api_error, HTTPException: _http_error,
                            Exception: _internal_error},
    )
