"""Device-local server settings layered over the bundle's ``server.toml``.

The bundle's ``server.toml`` is covered by the manifest, so editing it breaks verification
(exit 6). Settings that belong to one device (its port, API key, CORS origins, connection
limits, threads) live in a file outside the bundle instead: ``--config FILE`` /
``EDGEPACK_CONFIG``, default ``/etc/edgepack/server.toml`` when it exists. It has the same
``[engine]`` and ``[server]`` tables; ``[model]`` is refused (the model is what the manifest
verified).

Serving several bundles, ``[models."<model id>".engine]`` tables (the id /v1/models lists and
requests route by) set engine keys for that model only, e.g. an LLM's n_ctx and threads
beside an embedding model's. A table naming a model that is not served is refused, and so is
``[models."<id>".server]``: host, port, key and limits are server-wide.

Precedence, lowest first: bundle → this file's ``[engine]`` → its ``[models."<id>".engine]`` →
``EDGEPACK_*`` variables and flags. The command line is the most explicit: ``--threads 2``
wins over a per-model table as it does over ``[engine]`` (as llama-server's and Ollama's
flags win over their files); leave the flag unset to let each model's table decide.

Device side, standard library only. The update agent reads the same file for the API key its
health checks must send.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_LOCAL_CONFIG = Path("/etc/edgepack/server.toml")
CONFIG_ENV = "EDGEPACK_CONFIG"
MAX_CONFIG_BYTES = 64 * 1024

# toml table, key → (ServerConfig field, accepted types)
_KEYS: dict[tuple[str, str], tuple[str, tuple[type, ...]]] = {
    ("engine", "n_ctx"): ("n_ctx", (int,)),
    ("engine", "n_threads"): ("n_threads", (int,)),
    ("engine", "n_batch"): ("n_batch", (int,)),
    ("engine", "n_gpu_layers"): ("n_gpu_layers", (int,)),
    ("engine", "n_parallel"): ("n_parallel", (int,)),
    ("engine", "providers"): ("providers", (list,)),
    ("server", "host"): ("host", (str,)),
    ("server", "port"): ("port", (int,)),
    ("server", "api_key"): ("api_key", (str,)),
    ("server", "queue_size"): ("queue_size", (int,)),
    ("server", "max_body_bytes"): ("max_body_bytes", (int,)),
    ("server", "drain_seconds"): ("drain_seconds", (int, float)),
    ("server", "request_timeout_seconds"): ("request_timeout_seconds", (int, float)),
    ("server", "cors_origins"): ("cors_origins", (list,)),
    ("server", "max_connections"): ("max_connections", (int,)),
    ("server", "header_timeout_seconds"): ("header_timeout_seconds", (int, float)),
    ("server", "body_timeout_seconds"): ("body_timeout_seconds", (int, float)),
    ("server", "keep_alive_seconds"): ("keep_alive_seconds", (int, float)),
}


def local_config_path(explicit: str | os.PathLike[str] | None,
                      environ: Mapping[str, str]) -> Path | None:
    """The file to read: ``explicit``, else $EDGEPACK_CONFIG, else the default if it exists.

    An explicitly named file must exist (ConfigError otherwise); the default is optional.
    """
    named = explicit or environ.get(CONFIG_ENV) or None
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist or is not a file",
                              hint="pass an existing file to --config (or unset "
                              f"{CONFIG_ENV})")
        return path
    return DEFAULT_LOCAL_CONFIG if DEFAULT_LOCAL_CONFIG.is_file() else None


@dataclass(frozen=True)
class LocalConfig:
    """One device-local file, parsed: its ServerConfig fields, and each model's own."""

    path: Path
    settings: dict[str, Any] = field(default_factory=dict)  # [engine] and [server]
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # [models."ID".engine]

    def for_model(self, model_id: str) -> dict[str, Any]:
        """The fields for ``model_id``: [engine] and [server], then its own table over them."""
        return {**self.settings, **self.models.get(model_id, {})}

    def check_served(self, served: Sequence[str]) -> None:
        """ConfigError when a ``[models."ID"]`` table names a model this server does not serve
        (a typo would otherwise leave that model on the bundle's settings, silently)."""
        for model_id in self.models:
            if model_id not in served:
                names = ", ".join(repr(s) for s in served)
                raise ConfigError(
                    f"{self.path}: [models.{_quoted(model_id)}] names model {model_id!r}, "
                    f"which this server does not serve; it serves {names}",
                    hint="use a model id GET /v1/models lists, or delete the table")


def _quoted(model_id: str) -> str:
    return '"' + model_id.replace("\\", "\\\\").replace('"', '\\"') + '"'


def read_local_config(path: Path) -> LocalConfig:
    """The settings ``path`` sets; ConfigError naming any bad table, key or type."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror or e}") from e
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {str(path)!r} is {len(raw)} bytes; the limit is "
                          f"{MAX_CONFIG_BYTES}")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    out = LocalConfig(path)
    for table, items in data.items():
        if table == "model":
            raise ConfigError(f"{path}: [model] cannot be overridden on the device",
                              hint="the model is what the bundle's manifest verified; build "
                              "another bundle to serve another model")
        if table == "models" and isinstance(items, dict):
            out.models.update(_model_tables(path, items))
            continue
        if table not in ("engine", "server") or not isinstance(items, dict):
            raise ConfigError(f"{path}: unknown table [{table}], expected [engine], [server] "
                              'or [models."<model id>".engine]')
        out.settings.update(_settings(path, table, f"[{table}]", items))
    return out


def _model_tables(path: Path, models: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``[models."ID".engine]`` → {ID: fields}; any other table under a model is refused."""
    out: dict[str, dict[str, Any]] = {}
    for model_id, tables in models.items():
        where = f"[models.{_quoted(model_id)}]"
        if not isinstance(tables, dict):
            raise ConfigError(f"{path}: {where} must be a table holding an [engine] table, "
                              f"got {type(tables).__name__}")
        out[model_id] = {}
        for table, items in tables.items():
            sub = f"[models.{_quoted(model_id)}.{table}]"
            if table == "server":
                raise ConfigError(
                    f"{path}: {sub}: server settings are server-wide (one host, port, API key "
                    "and set of limits for every model), not per model",
                    hint="move these keys to the [server] table")
            if table != "engine" or not isinstance(items, dict):
                what = "table" if isinstance(items, dict) else "key"
                raise ConfigError(f"{path}: {where} {table}: unknown {what}; a model's settings "
                                  f"go in [models.{_quoted(model_id)}.engine]")
            out[model_id].update(_settings(path, "engine", sub, items))
    return out


def _settings(path: Path, table: str, where: str, items: dict[str, Any]) -> dict[str, Any]:
    """The ServerConfig fields one ``table`` (shown as ``where``) sets, checked."""
    out: dict[str, Any] = {}
    for key, value in items.items():
        spec = _KEYS.get((table, key))
        if spec is None and (table, key) == ("engine", "flash_attn"):
            raise ConfigError(
                f"{path}: {where} flash_attn is the bundle's own setting: the attention kernels "
                "its build validated the answers with (they can change a greedy answer)",
                hint="remove it here; `edgepack build` chooses it and records it in the bundle")
        if spec is None:
            known = ", ".join(k for t, k in _KEYS if t == table)
            raise ConfigError(f"{path}: {where} {key} is not a setting; known: {known}")
        name, kinds = spec
        if isinstance(value, bool) or not isinstance(value, kinds):
            want = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(f"{path}: {where} {key} = {value!r} is a "
                              f"{type(value).__name__}, expected {want}")
        if isinstance(value, list):
            if not all(isinstance(x, str) for x in value):
                raise ConfigError(f"{path}: {where} {key} must be a list of strings")
            value = tuple(value)
        elif name.endswith("_seconds"):
            value = float(value)  # type: ignore[arg-type]  # int or float, checked above
        out[name] = value
    return out


def local_api_key(environ: Mapping[str, str]) -> str | None:
    """The API key a local client (the update agent) must send: $EDGEPACK_API_KEY, else the
    device-local config's ``[server] api_key``; None when neither sets one."""
    key = environ.get("EDGEPACK_API_KEY")
    if key:
        return key
    path = local_config_path(None, environ)
    if path is None:
        return None
    value = read_local_config(path).settings.get("api_key")
    return str(value) if value else None
