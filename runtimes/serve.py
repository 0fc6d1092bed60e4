"""Run the server for a bundle: verify, configure, bind, serve, drain, exit.

Exit codes (DESIGN.md): 0 after a clean drain, 6 when the bundle's files do not match its
manifest (the server refuses to start), 7 when the engine cannot load or breaks before it
is ready, 3 for a bad server.toml or flag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import uvicorn
from edgepack.runtimes.config import ServerConfig, load_server_config, validate_config
from edgepack.runtimes.connections import ConnectionLimits, fd_budget, uvicorn_options
from edgepack.runtimes.engine import Engine, EngineError

from edgepack.errors import ConfigError, RuntimeHealthError
from edgepack.manifest import verify_bundle

log = logging.getLogger("edgepack.serve")


@dataclass(frozen=True)
class ServeOptions:
    """Command-line overrides; None keeps the bundle's server.toml value."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    threads: int | None = None
    queue_size: int | None = None
    ctx: int | None = None
    log_level: str = "info"


def make_engine(cfg: ServerConfig) -> Engine:
    """The engine for the bundle's model format; EngineError when none is available."""
    if cfg.model_format == "gguf":
        from edgepack.runtimes.llama_engine import LlamaEngine, LlamaSettings

        return LlamaEngine(LlamaSettings(
            model_path=cfg.model_path, name=cfg.model_name, kind=cfg.model_kind,
            n_ctx=cfg.n_ctx, n_threads=cfg.n_threads, n_batch=cfg.n_batch,
            n_gpu_layers=cfg.n_gpu_layers,
        ))
    if cfg.model_format == "onnx":
        from edgepack.runtimes.onnx_engine import OnnxEngine, OnnxSettings

        return OnnxEngine(OnnxSettings(
            model_path=cfg.model_path, tokenizer_dir=cfg.bundle_dir / "tokenizer",
            name=cfg.model_name, kind=cfg.model_kind, n_ctx=cfg.n_ctx,
            n_threads=cfg.n_threads, providers=cfg.providers,
        ))
    raise EngineError(
        f"no engine for model format {cfg.model_format!r} in this edgepack version",
        hint="rebuild the bundle with --format gguf or --format onnx",
    )


def prepare(bundle_dir: str | os.PathLike[str], opts: ServeOptions,
            environ: Mapping[str, str]) -> ServerConfig:
    """Verify the bundle (IntegrityError → exit 6) and build the effective config."""
    manifest = verify_bundle(bundle_dir)
    cfg = load_server_config(bundle_dir, manifest, environ)
    api_key = opts.api_key or environ.get("EDGEPACK_API_KEY") or None
    cfg = cfg.with_overrides(host=opts.host, port=opts.port, api_key=api_key,
                             n_threads=opts.threads, queue_size=opts.queue_size, n_ctx=opts.ctx)
    validate_config(cfg)
    return cfg


def connection_limits(cfg: ServerConfig) -> ConnectionLimits:
    """The connection bounds for ``cfg``, with the cap fitted under the descriptor limit."""
    cap = fd_budget(cfg.max_connections)
    if cap < 8:
        raise ConfigError(
            f"the file-descriptor limit leaves room for only {cap} connections",
            hint="raise it (systemd: LimitNOFILE=; shell: ulimit -n 1024)",
        )
    if cap < cfg.max_connections:
        log.warning("max_connections %d lowered to %d to stay under the file-descriptor limit "
                    "(raise LimitNOFILE to allow more)", cfg.max_connections, cap)
    return ConnectionLimits(max_connections=cap, header_timeout=cfg.header_timeout_seconds,
                            body_timeout=cfg.body_timeout_seconds,
                            keep_alive=cfg.keep_alive_seconds)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; ConfigError naming host:port when it cannot bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                          hint="pick another --port or stop what listens there") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(
    bundle_dir: str | os.PathLike[str],
    opts: ServeOptions,
    environ: Mapping[str, str] | None = None,
    announce: Callable[[str], None] | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; return 0 after the drain.

    Raises IntegrityError (6) for a tampered bundle, ConfigError (3) for bad settings and
    RuntimeHealthError (7) when the engine cannot load.
    """
    from edgepack.runtimes.app import create_app

    env = dict(os.environ if environ is None else environ)
    cfg = prepare(bundle_dir, opts, env)
    engine = make_engine(cfg)
    app = create_app(cfg, engine, env)
    limits = connection_limits(cfg)
    sock = bind_socket(cfg.host, cfg.port)
    port = sock.getsockname()[1]
    server = _Server(uvicorn.Config(
        app,
        lifespan="on",
        log_level=opts.log_level,
        access_log=False,  # our own access log (runtimes/access_log.py) has route and tokens
        timeout_graceful_shutdown=int(cfg.drain_seconds) or None,
        **uvicorn_options(limits),
    ))
    (announce or _print)(
        f"edgepack serve: {cfg.model_name} ({cfg.model_kind}, {cfg.model_format}) on "
        f"http://{cfg.host}:{port}  api-key: {'on' if cfg.api_key else 'off'}  "
        f"threads: {cfg.n_threads}  ctx: {cfg.n_ctx}  queue: {cfg.queue_size}"
    )
    try:
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        sock.close()
    if server.engine_error is not None:
        err = server.engine_error
        if isinstance(err, RuntimeHealthError):
            raise err
        raise EngineError(f"the engine failed: {type(err).__name__}: {err}") from err
    return 0


def _print(line: str) -> None:
    print(line, file=sys.stdout, flush=True)


class _Server(uvicorn.Server):
    """uvicorn.Server that drains readiness on SIGTERM and stops when the engine fails."""

    engine_error: BaseException | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        state = _app_state(self.config)
        if state is not None:
            state.lifecycle.begin_drain()
            log.info("signal %s: draining (up to %s s for requests in flight)",
                     sig, state.config.drain_seconds)
            # uvicorn cancels what still runs at its graceful-shutdown deadline, which a client
            # sees as a 500. Stop generations between two tokens just before that, so each
            # request ends with a proper 503 (or a closed stream) instead.
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().call_later(
                    max(0.0, float(state.config.drain_seconds) - 1.0), _stop_generations, state
                )
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after shutdown (the exit status then says "killed");
        # DESIGN.md wants a drained server to exit 0.
        self._captured_signals.clear()

    async def on_tick(self, counter: int) -> bool:
        state = _app_state(self.config)
        if state is not None and state.lifecycle.failed.is_set() and state.lifecycle.model is None:
            # It could not load: nothing to serve; exit 7 rather than run a broken server.
            self.engine_error = state.lifecycle.error_exc
            return True
        return await super().on_tick(counter)


def _stop_generations(state: Any) -> None:
    for token in list(state.active):
        token.cancel("shutdown")


def _app_state(config: uvicorn.Config) -> Any:
    state = getattr(config.app, "state", None)
    return getattr(state, "server", None) if state is not None else None
