"""The server's configuration: the bundle's server.toml, then command-line overrides.

Device side, standard library only. Read from arguments and an ``environ`` mapping, never at
import time.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgepack.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SERVER_TOML = "server.toml"
KINDS = ("chat", "completion", "embedding")
FORMATS = ("gguf", "onnx")
# Test hook (name says so): seconds to sleep before the engine loads, so tests can watch
# /readyz answer 503 during a load without needing a big model. Never set it in production.
TEST_HOOK_LOAD_DELAY = "EDGEPACK_TEST_HOOK_LOAD_DELAY_SECONDS"


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``create_app`` and ``run_server`` need."""

    bundle_dir: Path
    model_path: Path
    model_format: str
    model_kind: str
    model_name: str
    engine_name: str = "llama.cpp"
    n_ctx: int = 2048
    n_threads: int = 4
    n_batch: int = 512
    n_gpu_layers: int = 0
    n_parallel: int = 1  # sequences decoded together (llama-server's --parallel); see batch.py
    # llama.cpp's flash-attention kernels: as the build validated the bundle (its [engine]
    # table says; absent in bundles built before it was recorded, which were validated without).
    flash_attn: bool = False
    providers: tuple[str, ...] = ("cpu",)  # onnxruntime execution providers, in priority order
    queue_size: int = 8
    max_body_bytes: int = 1 << 20
    drain_seconds: float = 30.0
    request_timeout_seconds: float = 300.0
    # Connection bounds (runtimes/connections.py): open sockets, seconds for a request's head,
    # for its body, and idle seconds between two requests on one connection.
    max_connections: int = 256
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    keep_alive_seconds: float = 5.0
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    model_sha256: str = ""
    tokenizer_dir: Path | None = None  # ONNX: where the tokenizer loads from (verified links)
    quant: str = ""
    bundle_name: str = ""
    bundle_version: str = ""
    load_delay_seconds: float = 0.0  # test hook, see TEST_HOOK_LOAD_DELAY
    # What serve decided about this device (engine_check.py): where it computes, and every
    # setting it changed from what the bundle asked (shown at start and in /readyz).
    compute: str = "cpu"
    adjustments: tuple[str, ...] = ()
    config_file: str = ""  # the device-local override file, when one was read
    model_source: str = ""  # what the engine loads: the verified descriptor or the path
    # The plan's memory figures (manifest "plan"), for the memory check at start
    # (memory_budget.py): bytes the bundle needs, of which KV cache, for ctx x slots cells.
    planned_bytes: int = 0
    planned_kv_bytes: int = 0
    planned_kv_cells: int = 0

    def with_overrides(self, **changes: Any) -> ServerConfig:
        """A copy with the non-None ``changes`` applied (command-line flags)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def effective_config(cfg: ServerConfig) -> dict[str, Any]:
    """The settings the server runs with, for the start line and /readyz (no secrets)."""
    return {
        "bundle_dir": str(cfg.bundle_dir), "model_file": _rel(cfg),
        "model_source": cfg.model_source, "format": cfg.model_format, "kind": cfg.model_kind,
        "n_ctx": cfg.n_ctx, "n_threads": cfg.n_threads, "n_batch": cfg.n_batch,
        "n_gpu_layers": cfg.n_gpu_layers, "n_parallel": cfg.n_parallel,
        "flash_attn": cfg.flash_attn, "providers": list(cfg.providers),
        "compute": cfg.compute, "queue_size": cfg.queue_size,
        "max_body_bytes": cfg.max_body_bytes, "drain_seconds": cfg.drain_seconds,
        "request_timeout_seconds": cfg.request_timeout_seconds,
        "max_connections": cfg.max_connections,
        "header_timeout_seconds": cfg.header_timeout_seconds,
        "body_timeout_seconds": cfg.body_timeout_seconds,
        "keep_alive_seconds": cfg.keep_alive_seconds,
        "host": cfg.host, "port": cfg.port, "api_key": "set" if cfg.api_key else "unset",
        "cors_origins": list(cfg.cors_origins), "config_file": cfg.config_file,
        "adjustments": list(cfg.adjustments),
    }


def _rel(cfg: ServerConfig) -> str:
    try:
        return cfg.model_path.relative_to(cfg.bundle_dir).as_posix()
    except ValueError:
        return str(cfg.model_path)


def _table(data: Mapping[str, Any], name: str, path: Path) -> Mapping[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: [{name}] must be a table, got {type(value).__name__}")
    return value


def _get(table: Mapping[str, Any], key: str, kind: type | tuple[type, ...], default: Any,
         where: str) -> Any:
    value = table.get(key, default)
    if value is None:
        return None
    ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in
                                          (kind if isinstance(kind, tuple) else (kind,)))
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(
            f"{where}: {key} = {value!r} is a {type(value).__name__}, expected {names}",
            hint="fix server.toml in the bundle (or rebuild it)",
        )
    return value


def load_server_config(
    bundle_dir: str | os.PathLike[str],
    manifest: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    text: str | None = None,
) -> ServerConfig:
    """Read ``server.toml`` of a bundle (plus facts from its manifest) into a ServerConfig.

    ``text`` is the file's content when the caller already read it (from the descriptor it
    verified). Raises ConfigError naming the file, the key and the expected type when it is
    invalid.
    """
    root = Path(bundle_dir)
    path = root / SERVER_TOML
    environ = os.environ if environ is None else environ
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8") if text is None else text)
    except FileNotFoundError as e:
        raise ConfigError(f"bundle {str(root)!r} has no {SERVER_TOML}",
                          hint="rebuild the bundle with `edgepack build`") from e
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}",
                          hint="rebuild the bundle or fix the file") from e
    model = _table(data, "model", path)
    engine = _table(data, "engine", path)
    server = _table(data, "server", path)
    where_m, where_e, where_s = f"{path} [model]", f"{path} [engine]", f"{path} [server]"

    rel = _get(model, "path", str, None, where_m)
    if not rel:
        raise ConfigError(f"{where_m}: 'path' is missing", hint="rebuild the bundle")
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise ConfigError(f"{where_m}: path {rel!r} must stay inside the bundle")
    fmt = _get(model, "format", str, "gguf", where_m)
    kind = _get(model, "kind", str, "chat", where_m)
    if fmt not in FORMATS:
        raise ConfigError(f"{where_m}: format {fmt!r}, expected one of {', '.join(FORMATS)}")
    if kind not in KINDS:
        raise ConfigError(f"{where_m}: kind {kind!r}, expected one of {', '.join(KINDS)}")
    name = _get(model, "name", str, None, where_m) or Path(rel).stem

    man = manifest or {}
    man_model = man.get("model", {}) if isinstance(man.get("model"), dict) else {}
    man_bundle = man.get("bundle", {}) if isinstance(man.get("bundle"), dict) else {}
    planned = _planned_memory(man.get("plan"))
    cors = _get(server, "cors_origins", list, [], where_s)
    delay = environ.get(TEST_HOOK_LOAD_DELAY, "")
    try:
        load_delay = float(delay) if delay else 0.0
    except ValueError as e:
        raise ConfigError(f"{TEST_HOOK_LOAD_DELAY}={delay!r} is not a number") from e

    cfg = ServerConfig(
        bundle_dir=root,
        model_path=root / rel,
        model_format=fmt,
        model_kind=kind,
        model_name=name,
        engine_name=_get(engine, "name", str, "llama.cpp", where_e),
        n_ctx=_get(engine, "n_ctx", int, 2048, where_e),
        n_threads=_get(engine, "n_threads", int, os.cpu_count() or 1, where_e),
        n_batch=_get(engine, "n_batch", int, 512, where_e),
        n_gpu_layers=_get(engine, "n_gpu_layers", int, 0, where_e),
        n_parallel=_get(engine, "n_parallel", int, 1, where_e),
        flash_attn=_get(engine, "flash_attn", bool, False, where_e),
        providers=tuple(str(x) for x in _get(engine, "providers", list, ["cpu"], where_e)),
        queue_size=_get(server, "queue_size", int, 8, where_s),
        max_body_bytes=_get(server, "max_body_bytes", int, 1 << 20, where_s),
        drain_seconds=float(_get(server, "drain_seconds", (int, float), 30, where_s)),
        request_timeout_seconds=float(
            _get(server, "request_timeout_seconds", (int, float), 300, where_s)
        ),
        max_connections=_get(server, "max_connections", int, 256, where_s),
        header_timeout_seconds=float(
            _get(server, "header_timeout_seconds", (int, float), 10, where_s)),
        body_timeout_seconds=float(
            _get(server, "body_timeout_seconds", (int, float), 30, where_s)),
        keep_alive_seconds=float(_get(server, "keep_alive_seconds", (int, float), 5, where_s)),
        cors_origins=tuple(str(o) for o in cors),
        model_sha256=str(man_model.get("sha256", "")),
        quant=str(man_model.get("quant", "")),
        bundle_name=str(man_bundle.get("name", "")),
        bundle_version=str(man_bundle.get("version", "")),
        load_delay_seconds=load_delay,
        planned_bytes=planned[0], planned_kv_bytes=planned[1], planned_kv_cells=planned[2],
    )
    validate_config(cfg)
    return cfg


def _planned_memory(plan: Any) -> tuple[int, int, int]:
    """(required bytes, KV cache bytes, KV cells = ctx x slots) from a manifest's plan;
    zeros where the plan does not say (a bundle made without the planner)."""
    if not isinstance(plan, dict) or not isinstance(plan.get("memory"), dict):
        return 0, 0, 0

    def whole(v: Any) -> int:
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0

    mem = plan["memory"]
    cells = whole(plan.get("ctx")) * (whole(plan.get("parallel")) or 1)
    return whole(mem.get("required_bytes")), whole(mem.get("kv_cache_bytes")), cells


def validate_config(cfg: ServerConfig) -> None:
    """Raise ConfigError for values no server can run with (after overrides too)."""
    checks = [
        ("n_ctx", cfg.n_ctx, 16),
        ("n_threads", cfg.n_threads, 1),
        ("n_batch", cfg.n_batch, 1),
        ("n_parallel", cfg.n_parallel, 1),
        ("queue_size", cfg.queue_size, 0),
        ("max_body_bytes", cfg.max_body_bytes, 1024),
        ("port", cfg.port, 0),
        ("max_connections", cfg.max_connections, 8),
    ]
    for key, value, low in checks:
        if value < low:
            raise ConfigError(f"{key} = {value} is too small (at least {low})")
    if cfg.port > 65535:
        raise ConfigError(f"port = {cfg.port} is not a TCP port (0-65535)")
    if cfg.drain_seconds < 0 or cfg.request_timeout_seconds <= 0:
        raise ConfigError("drain_seconds must be >= 0 and request_timeout_seconds > 0")
    for key in ("header_timeout_seconds", "body_timeout_seconds", "keep_alive_seconds"):
        value = getattr(cfg, key)
        if not 0 < value <= 3600:
            raise ConfigError(f"{key} = {value} is out of range (more than 0, at most 3600)")
