"""A small stdlib client for an edgepack server (device side: no httpx, no openai).

Used by ``edgepack chat`` and the Python API. Speaks the server's OpenAI-compatible routes;
streams chat completions over server-sent events. Errors become
:class:`edgepack.errors.RuntimeHealthError` naming the URL and the server's own message.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import Any

from edgepack.errors import RuntimeHealthError

# Bounds: one SSE line or one JSON reply larger than this is not from an edgepack server.
MAX_LINE_BYTES = 1 << 20
MAX_BODY_BYTES = 8 << 20


class ServerClient:
    """``ServerClient("http://127.0.0.1:8080", api_key=None)``."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 300) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def _request(self, path: str, body: Any = None) -> urllib.request.Request:
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        return urllib.request.Request(self.base_url + path, data=data, headers=headers)

    def _open(self, path: str, body: Any = None, timeout: float | None = None) -> Any:
        try:
            return urllib.request.urlopen(self._request(path, body),  # noqa: S310 - http(s) only
                                          timeout=timeout or self.timeout)
        except urllib.error.HTTPError as e:
            raise _http_error(self.base_url + path, e) from e
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RuntimeHealthError(
                f"cannot reach the server at {self.base_url}: {reason}",
                hint="start one with `edgepack serve BUNDLE`, or pass a bundle folder to "
                "`edgepack chat` to start one",
            ) from e

    def get_json(self, path: str, timeout: float | None = None) -> Any:
        """GET ``path`` and parse the JSON reply."""
        with self._open(path, timeout=timeout) as r:
            return json.loads(r.read(MAX_BODY_BYTES))

    def ready(self) -> dict[str, Any] | None:
        """/readyz's JSON when the model is ready, else None (loading, or not reachable)."""
        try:
            with urllib.request.urlopen(self.base_url + "/readyz", timeout=5) as r:  # noqa: S310
                return dict(json.loads(r.read(MAX_BODY_BYTES)))
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def model(self) -> str:
        """The id of the model the server serves."""
        data = self.get_json("/v1/models")
        return str(data["data"][0]["id"])

    def stream_chat(self, model: str, messages: Sequence[dict[str, str]],
                    **params: Any) -> Iterator[str]:
        """Yield the assistant's text piece by piece (``stream: true``)."""
        body = {"model": model, "messages": list(messages), "stream": True, **params}
        with self._open("/v1/chat/completions", body) as r:
            while True:
                line = r.readline(MAX_LINE_BYTES)
                if not line:
                    return
                text = line.decode("utf-8", "replace").strip()
                if not text.startswith("data:"):
                    continue
                payload = text[5:].strip()
                if payload == "[DONE]":
                    return
                event = json.loads(payload)
                if "error" in event:
                    raise RuntimeHealthError(f"the server stopped the answer: "
                                             f"{event['error'].get('message')}")
                for choice in event.get("choices", ()):
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece


def _http_error(url: str, e: urllib.error.HTTPError) -> RuntimeHealthError:
    try:
        message = json.loads(e.read(MAX_BODY_BYTES))["error"]["message"]
    except Exception:  # noqa: BLE001 - not an OpenAI-shaped body; report the status alone
        message = e.reason
    hint = ("pass the server's key with --api-key or EDGEPACK_API_KEY" if e.code == 401
            else "see the server's log")
    return RuntimeHealthError(f"{url} answered {e.code}: {message}", hint=hint)
