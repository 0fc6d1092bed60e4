"""One access-log line per request, plain or JSON, and the request id that ties them together.

The line carries method, route (the route template, so a line never echoes a random path),
path (truncated, escaped), status, duration, tokens in/out and the request id. The request id
is the client's ``X-Request-Id`` when it is short and plain (so a proxy's id carries through),
otherwise a fresh one; either way it is echoed in the response's ``X-Request-Id`` header.

Device side: standard library only.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import MutableMapping
from typing import Any

ACCESS_LOGGER = "edgepack.access"
REQUEST_ID_HEADER = b"x-request-id"
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
_MAX_PATH = 200


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-Id when it is 1-64 plain characters, else a new random one."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER and _CLIENT_ID.fullmatch(value):
            return value.decode("ascii")
    return uuid.uuid4().hex


# One mutable slot per request, set by the middleware: a route (or the streaming task it
# spawns, which inherits the context) fills it without the middleware passing it along.
_USAGE: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "edgepack_usage", default=None)


def begin_usage() -> dict[str, Any]:
    """A fresh slot (token counts, the model served) for the request in this context."""
    slot: dict[str, Any] = {}
    _USAGE.set(slot)
    return slot


def note_model(label: str) -> None:
    """Record which model the current request went to (a metrics label; no-op outside one)."""
    slot = _USAGE.get()
    if slot is not None:
        slot["model"] = label


def note_usage(prompt_tokens: int, completion_tokens: int | None = None) -> None:
    """Record the current request's token counts for its access-log line (no-op outside one)."""
    slot = _USAGE.get()
    if slot is not None:
        slot["prompt_tokens"] = prompt_tokens
        if completion_tokens is not None:
            slot["completion_tokens"] = completion_tokens


def access_record(scope: MutableMapping[str, Any], route: str, status: int, started: float,
                  rid: str, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fields of one access-log line."""
    usage = usage or {}
    tokens_in, tokens_out = usage.get("prompt_tokens"), usage.get("completion_tokens")
    path = scope.get("path", "")
    client = scope.get("client") or ("", 0)
    return {
        "method": scope.get("method", ""),
        "route": route,
        "path": path if len(path) <= _MAX_PATH else path[:_MAX_PATH] + "…",
        "status": status,
        "duration_ms": round((time.perf_counter() - started) * 1000, 1),
        "prompt_tokens": tokens_in,
        "completion_tokens": tokens_out,
        "request_id": rid,
        "client": client[0],
    }


class PlainFormatter(logging.Formatter):
    """``time level message`` for ordinary lines; access lines as ``key=value`` pairs."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "access", None)
        if isinstance(fields, dict):
            record.msg = " ".join(
                f"{k}={json.dumps(v, ensure_ascii=True) if isinstance(v, str) else v}"
                for k, v in fields.items() if v is not None
            )
            record.args = ()
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus the access fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = getattr(record, "access", None)
        if isinstance(fields, dict):
            out["message"] = "request"
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str, fmt: str) -> None:
    """Send edgepack's and uvicorn's logs to stderr in ``fmt`` ("plain" or "json").

    The access log is on at "info" and below; the level applies to everything else.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    numeric = getattr(logging, level.upper(), logging.INFO)
    for name in ("edgepack", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(numeric)
        logger.propagate = False
    access = logging.getLogger(ACCESS_LOGGER)
    access.handlers[:] = [handler]
    access.propagate = False
    access.setLevel(logging.INFO if numeric <= logging.INFO else logging.WARNING)
