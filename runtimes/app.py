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
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from edgepack.runtimes import generation
from edgepack.runtimes.access_log import (
    ACCESS_LOGGER,
    REQUEST_ID_HEADER,
    access_record,
    begin_usage,
    request_id,
)
from edgepack.runtimes.config import ServerConfig
from edgepack.runtimes.engine import Engine
from edgepack.runtimes.lifecycle import READY
from edgepack.runtimes.metrics import NO_MODEL, ServerMetrics
from edgepack.runtimes.models import ModelSet, model_card
from edgepack.runtimes.openai_schema import ApiError
from edgepack.runtimes.page import basic_password, status_page
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
    """Everything the routes need; one per app, on ``app.state.server``.

    ``config`` holds the server-wide settings (host, port, API key, body and connection
    limits, drain): the first bundle's, with the device's overrides. Each model's own state
    (engine, queue, lifecycle) is in ``models`` (runtimes/models.py).
    """

    config: ServerConfig
    models: ModelSet
    metrics: ServerMetrics


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def state_of(request: Request) -> ServerState:
    return request.app.state.server  # type: ignore[no-any-return]


# -- open routes ---------------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    s = state_of(request)
    return JSONResponse({"status": "ok", "phase": s.models.phase})


async def readyz(request: Request) -> Response:
    """200 when every model is ready. One bundle: that model's status, as it always was;
    several: ``{"status", "models": [one status per model]}``."""
    s = state_of(request)
    phase = s.models.phase
    code = 200 if phase == READY else 503
    if len(s.models) > 1:
        return JSONResponse({"status": phase, "models": [m.status() for m in s.models]},
                            status_code=code)
    body = s.models.first.status()
    if phase != READY:
        body = {k: v for k, v in body.items() if k in ("status", "error")}
    return JSONResponse(body, status_code=code)


async def metrics(request: Request) -> Response:
    s = state_of(request)
    s.metrics.ready.set(1 if s.models.phase == READY else 0)
    return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def list_models(request: Request) -> Response:
    s = state_of(request)
    return JSONResponse({"object": "list", "data": [model_card(m.config) for m in s.models]})


async def get_model(request: Request) -> Response:
    s = state_of(request)
    return JSONResponse(model_card(s.models.route(request.path_params["model"]).config))


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
    """API key for /v1/*, request id, request metrics by route template (and model), the access
    log.

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
                model = usage.get("model", NO_MODEL)  # a served id, or a fixed value
                state.metrics.requests.labels(route, str(status["code"]), model).inc()
                state.metrics.latency.labels(route, model).observe(time.perf_counter() - t0)
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
    *,
    more: Sequence[tuple[ServerConfig, Engine]] = (),
) -> Starlette:
    """Build the server app for ``engine`` (and the ``more`` models served beside it).

    Nothing is loaded yet: the lifespan loads every engine in the background. ``config`` also
    gives the server-wide settings (API key, CORS, limits).
    """
    environ = dict(os.environ if environ is None else environ)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        m = ServerMetrics()
        models = ModelSet([(config, engine), *more], m, environ)
        app.state.server = ServerState(config, models, m)
        models.start()
        try:
            yield
        finally:
            models.begin_drain()
            await models.stop()
            # Past the drain deadline: whatever still runs is stopped between two tokens.
            models.cancel_generations()
            # Queued jobs (if any) finish, then each engine is freed on its own thread.
            models.close()

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
