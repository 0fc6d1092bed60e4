"""Run the server for one or more bundles: verify, configure, bind, serve, drain, exit.

Exit codes (DESIGN.md): 0 after a clean drain, 6 when a bundle's files do not match its
manifest (the server refuses to start), 7 when an engine cannot load or breaks before it
is ready, or when the bundles' planned memory does not fit (memory_budget.py), 3 for a bad
server.toml or flag (incl. two bundles with one model id), 2 for options that make no sense
with several bundles.

Several bundles (``edgepack serve A B``): each is verified and configured as it would be
alone (its own server.toml, then the device's --config file with its
``[models."<id>".engine]`` table for that model, ``EDGEPACK_*`` and flags, which apply to every
bundle); server-wide settings (host, port, API key, body and connection limits, drain) come
from the first bundle's configuration. ``--ctx`` is refused there: a context belongs to one
model (the file's per-model n_ctx sets each).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import uvicorn
from edgepack.runtimes.access_log import configure_logging
from edgepack.runtimes.config import (
    SERVER_TOML,
    ServerConfig,
    effective_config,
    load_server_config,
    validate_config,
)
from edgepack.runtimes.connections import ConnectionLimits, fd_budget, uvicorn_options
from edgepack.runtimes.engine import Engine, EngineError
from edgepack.runtimes.engine_check import reconcile
from edgepack.runtimes.local_config import LocalConfig, local_config_path, read_local_config
from edgepack.runtimes.memory_budget import check_memory

from edgepack.errors import ConfigError, IntegrityError, RuntimeHealthError, UsageError
from edgepack.manifest import HeldFile, verify_and_hold

log = logging.getLogger("edgepack.serve")


@dataclass(frozen=True)
class ServeOptions:
    """Command-line (and ``EDGEPACK_*``) overrides; None keeps the configured value."""

    host: str | None = None
    port: int | None = None
    api_key: str | None = None
    threads: int | None = None
    queue_size: int | None = None
    ctx: int | None = None
    max_connections: int | None = None
    # Public keys (paths) one of which must have signed the bundle (--require-signature).
    trusted_keys: tuple[str, ...] = ()
    log_level: str = "info"
    log_format: str = "plain"
    config: str | None = None
    cpu: bool = False
    providers: tuple[str, ...] | None = None
    memory_budget: int | None = None  # bytes; the memory check's bound when lower


def make_engine(cfg: ServerConfig) -> Engine:
    """The engine for the bundle's model format; EngineError when none is available."""
    if cfg.model_format == "gguf":
        from edgepack.runtimes.llama_engine import LlamaEngine, LlamaSettings

        settings = LlamaSettings(
            model_path=cfg.model_path, name=cfg.model_name, kind=cfg.model_kind,
            n_ctx=cfg.n_ctx, n_threads=cfg.n_threads, n_batch=cfg.n_batch,
            n_gpu_layers=cfg.n_gpu_layers, flash_attn=cfg.flash_attn,
        )
        if cfg.n_parallel > 1 and cfg.model_kind != "embedding":
            from edgepack.runtimes.batch import BatchedLlamaEngine

            return BatchedLlamaEngine(settings, cfg.n_parallel)
        return LlamaEngine(settings)
    if cfg.model_format == "onnx":
        from edgepack.runtimes.onnx_engine import OnnxEngine, OnnxSettings

        return OnnxEngine(OnnxSettings(
            model_path=cfg.model_path,
            tokenizer_dir=cfg.tokenizer_dir or cfg.bundle_dir / "tokenizer",
            name=cfg.model_name, kind=cfg.model_kind, n_ctx=cfg.n_ctx,
            n_threads=cfg.n_threads, providers=cfg.providers,
        ))
    raise EngineError(
        f"no engine for model format {cfg.model_format!r} in this edgepack version",
        hint="rebuild the bundle with --format gguf or --format onnx",
    )


def read_local(opts: ServeOptions, environ: Mapping[str, str]) -> LocalConfig | None:
    """The device-local config file (--config, $EDGEPACK_CONFIG or the default), if any."""
    path = local_config_path(opts.config, environ)
    return None if path is None else read_local_config(path)


def prepare(bundle_dir: str | os.PathLike[str], opts: ServeOptions,
            environ: Mapping[str, str],
            local: LocalConfig | None | Literal["read"] = "read") -> ServerConfig:
    """Verify the bundle (IntegrityError → exit 6) and build the effective config.

    The model file(s) and server.toml stay open on the descriptors they were hashed through,
    and the engine loads from those (``/proc/self/fd/N``): a file swapped after the check is
    never what runs (issue #13). Layers, lowest first: the bundle's server.toml, the
    device-local config file (``local``; "read" reads it here) with this model's
    ``[models."<id>".engine]`` over its ``[engine]``, ``EDGEPACK_*`` variables and flags; then
    the engine check.
    """
    root = Path(bundle_dir)
    signed = None
    if opts.trusted_keys:
        from edgepack.signature import signed_manifest_sha256, verify_signature

        # The signature covers the manifest's digest; the files are then hashed once, below,
        # against that very manifest (a manifest swapped in between is refused).
        signed = signed_manifest_sha256(verify_signature(root, opts.trusted_keys)[0])
    manifest, held = verify_and_hold(root, [SERVER_TOML], hold_under=("model/", "tokenizer/"),
                                     manifest_sha256=signed)
    if SERVER_TOML not in held:
        raise IntegrityError(f"bundle {str(root)!r}: {SERVER_TOML} is not in the manifest",
                             hint="rebuild the bundle")
    try:
        toml_text = held[SERVER_TOML].read_text()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{root / SERVER_TOML} is not UTF-8 text") from e
    finally:
        os.close(held.pop(SERVER_TOML).fd)
    cfg = load_server_config(root, manifest, environ, text=toml_text)
    cfg = _load_from_held(cfg, held)
    if local == "read":
        local = read_local(opts, environ)
    if isinstance(local, LocalConfig):
        cfg = cfg.with_overrides(config_file=str(local.path), **local.for_model(cfg.model_name))
    cfg = cfg.with_overrides(host=opts.host, port=opts.port, api_key=opts.api_key,
                             n_threads=opts.threads, queue_size=opts.queue_size, n_ctx=opts.ctx,
                             max_connections=opts.max_connections)
    try:
        validate_config(cfg)
    except ConfigError as e:
        # Serving several bundles, say which one and where its values can come from.
        sources = "the bundle's server.toml" + (f", {cfg.config_file}" if cfg.config_file
                                                else "") + ", EDGEPACK_* variables or flags"
        raise ConfigError(f"model {cfg.model_name!r} ({root}): {e.message}",
                          hint=e.hint or f"its settings come from {sources}; fix the value "
                          "there") from e
    return reconcile(cfg, cpu=opts.cpu, providers=opts.providers)


def _load_from_held(cfg: ServerConfig, held: dict[str, HeldFile]) -> ServerConfig:
    """Point the engine at the verified descriptors; /readyz reports their digest."""
    rel = cfg.model_path.relative_to(cfg.bundle_dir).as_posix()
    model = held.get(rel)
    if model is None:
        raise IntegrityError(
            f"server.toml names model file {rel!r}, which the manifest does not list under "
            "model/", hint="rebuild the bundle")
    if not Path(model.open_path).exists():  # no /proc (not Linux): load by name
        return cfg.with_overrides(model_sha256=model.sha256, model_source="path (no /proc)")
    if cfg.model_format == "gguf":
        for path in [p for p in held if not p.startswith("model/")]:
            os.close(held.pop(path).fd)  # a GGUF file carries its own tokenizer
        return cfg.with_overrides(model_path=Path(model.open_path),
                                  model_sha256=model.sha256,
                                  model_source=f"verified descriptor of {rel}")
    # ONNX graphs name their external data files relative to the graph, and the tokenizer
    # is a folder of files: a private folder of links to the verified descriptors keeps the
    # bundle's names (model/..., tokenizer/...) and still reads the held inodes.
    farm = Path(tempfile.mkdtemp(prefix="edgepack-model-"))
    atexit.register(shutil.rmtree, farm, True)
    for path, h in held.items():
        (farm / path).parent.mkdir(parents=True, exist_ok=True)
        (farm / path).symlink_to(h.open_path)
    n_model = sum(p.startswith("model/") for p in held)
    n_tok = len(held) - n_model
    return cfg.with_overrides(
        model_path=farm / rel, model_sha256=model.sha256,
        tokenizer_dir=farm / "tokenizer" if n_tok else None,
        model_source=f"verified descriptors of model/ ({n_model} files)"
        + (f" and tokenizer/ ({n_tok} files)" if n_tok else ""))


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


def prepare_all(bundle_dirs: Sequence[str | os.PathLike[str]], opts: ServeOptions,
                environ: Mapping[str, str]) -> list[ServerConfig]:
    """``prepare`` each bundle; refuse what several bundles cannot share."""
    if not bundle_dirs:
        raise UsageError("no bundle to serve", hint="edgepack serve BUNDLE [BUNDLE...]")
    if len(bundle_dirs) > 1 and opts.ctx is not None:
        raise UsageError(
            f"--ctx {opts.ctx} with {len(bundle_dirs)} bundles: a context belongs to one "
            "model (an embedding model's is its maximum input)",
            hint="serve without --ctx (each bundle's server.toml has its planned context), "
            'or set a context per model in the --config file: [models."<model id>".engine] '
            "n_ctx = N")
    local = read_local(opts, environ)
    configs = [prepare(b, opts, environ, local) for b in bundle_dirs]
    if local is not None:
        local.check_served([c.model_name for c in configs])
    seen: dict[str, Path] = {}
    for cfg in configs:
        if cfg.model_name in seen:
            raise ConfigError(
                f"bundles {str(seen[cfg.model_name])!r} and {str(cfg.bundle_dir)!r} both "
                f"serve model {cfg.model_name!r}; requests name the model, so ids must differ",
                hint="serve one of them, or run a second server on another --port")
        seen[cfg.model_name] = cfg.bundle_dir
    return configs


def run_server(
    bundle_dir: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    opts: ServeOptions,
    environ: Mapping[str, str] | None = None,
    announce: Callable[[str], None] | None = None,
) -> int:
    """Serve one bundle (or several) until SIGTERM/SIGINT; return 0 after the drain.

    Raises IntegrityError (6) for a tampered bundle, ConfigError (3) for bad settings,
    UsageError (2) for options several bundles cannot share and RuntimeHealthError (7) when
    the bundles do not fit in memory or an engine cannot load.
    """
    from edgepack.runtimes.app import create_app

    bundles = ([bundle_dir] if isinstance(bundle_dir, (str, os.PathLike))
               else list(bundle_dir))
    env = dict(os.environ if environ is None else environ)
    configure_logging(opts.log_level, opts.log_format)
    if opts.api_key is None and env.get("EDGEPACK_API_KEY"):
        opts = replace(opts, api_key=env["EDGEPACK_API_KEY"])
    configs = prepare_all(bundles, opts, env)
    for need in check_memory(configs, opts.memory_budget):
        log.info("memory: %s needs %.0f MiB (%s)", need.model, need.bytes / 2**20, need.basis)
    cfg = configs[0]
    engines = [(c, make_engine(c)) for c in configs]
    app = create_app(cfg, engines[0][1], env, more=engines[1:])
    limits = connection_limits(cfg)
    sock = bind_socket(cfg.host, cfg.port)
    port = sock.getsockname()[1]
    server = _Server(uvicorn.Config(
        app,
        lifespan="on",
        log_level=opts.log_level,
        log_config=None,  # configure_logging() set up uvicorn's loggers (plain or JSON)
        access_log=False,  # our own access log (runtimes/access_log.py) has route and tokens
        timeout_graceful_shutdown=int(cfg.drain_seconds) or None,
        **uvicorn_options(limits),
    ))
    models = ", ".join(f"{c.model_name} ({c.model_kind}, {c.model_format})" for c in configs)
    (announce or _print)(
        f"edgepack serve: {models} on "
        f"http://{cfg.host}:{port}  api-key: {'on' if cfg.api_key else 'off'}  "
        + "  ".join(f"{'' if len(configs) == 1 else c.model_name + ': '}threads: "
                    f"{c.n_threads}  ctx: {c.n_ctx}  queue: {c.queue_size}" for c in configs)
        + f"  compute: {cfg.compute}{' (--cpu)' if opts.cpu else ''}"
    )
    for c in configs:
        log.info("effective config: %s", json.dumps(effective_config(c), sort_keys=True))
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
            state.models.begin_drain()
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

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn closes the listener first, so during the drain a probe got "connection
        # refused" instead of /readyz 503 (issue #13). Keep listening while requests in
        # flight finish (new generations get 503 "draining"), then let uvicorn close.
        state = _app_state(self.config)
        if state is not None and not self.force_exit:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + float(state.config.drain_seconds)
            while (state.models.in_system > 0 and loop.time() < deadline
                   and not self.force_exit):
                await asyncio.sleep(0.05)
            left = deadline - loop.time()
            self.config.timeout_graceful_shutdown = max(1, int(left) + 1)
        await super().shutdown(sockets)

    async def on_tick(self, counter: int) -> bool:
        state = _app_state(self.config)
        failure = state.models.load_failure() if state is not None else None
        if failure is not None:
            # A model could not load: the server cannot serve what it was asked to; exit 7
            # rather than run a broken (or partial) server.
            self.engine_error = failure
            return True
        return await super().on_tick(counter)


def _stop_generations(state: Any) -> None:
    state.models.cancel_generations()


def _app_state(config: uvicorn.Config) -> Any:
    state = getattr(config.app, "state", None)
    return getattr(state, "server", None) if state is not None else None
