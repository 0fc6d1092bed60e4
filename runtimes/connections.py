"""Connection limits uvicorn lacks: request-head and body deadlines, a connection cap.

uvicorn (0.54, h11) bounds the header size (``h11_max_incomplete_event_size``) and the idle
time *between* requests (``timeout_keep_alive``), but nothing bounds how long a client may take
to send a request: a socket that connects and sends nothing, or trickles one byte at a time,
holds a connection (and a file descriptor) for ever. uvicorn's own ``limit_concurrency``
answers a plain-text 503 to *every* request past the limit, health probes included.
Sources: https://github.com/Kludex/uvicorn/issues/157 (``--timeout-request-start`` and
``--timeout-request-complete`` are still open), and the slow-request analysis in
https://github.com/xorbitsai/inference/pull/5213.

``guarded_protocol(limits)`` returns an ``H11Protocol`` subclass that adds, per connection:

- a *head deadline*: the request line and headers must arrive within ``header_timeout``
  seconds of the connection opening (or of the first byte after a keep-alive pause);
- a *body deadline*: the whole body must arrive within ``body_timeout`` seconds of the head;
- a *connection cap*: past ``max_connections`` open connections, a new one first closes a
  connection that is not being answered (silent sockets first, then keep-alive pauses and
  slow heads; see ``_evict_one`` for the order), so a health probe gets in; only when every
  connection is busy with a response does the newcomer get an OpenAI-shaped 503 and a close.

A connection whose deadline passes is closed (a 408 when the head never completed); the
response of a request in progress is never cut by these deadlines, so long SSE streams are
unaffected. Device side: standard library, h11 and uvicorn only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("edgepack.serve")

# File descriptors the process needs besides client sockets: the model (mmap keeps one),
# the listening socket, logs, the notify socket, onnxruntime/llama.cpp threads' files.
FD_RESERVE = 64
# A silent socket younger than this may still hold an unread request (a probe under load).
FRESH_GRACE = 2.0


@dataclass(frozen=True)
class ConnectionLimits:
    """The bounds one server applies to every client connection."""

    max_connections: int = 256
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive: float = 5.0
    max_header_bytes: int = 16 * 1024


def fd_budget(wanted: int) -> int:
    """The connection cap that fits the file-descriptor limit, raising the soft limit first.

    Raises the soft ``RLIMIT_NOFILE`` towards the hard one (as Go's runtime and nginx's
    ``worker_rlimit_nofile`` do), then returns ``wanted`` or less, so that accepting
    ``max_connections`` sockets can never exhaust the descriptors the server itself needs.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < target:
        new_soft = target if hard == resource.RLIM_INFINITY else min(target, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
            soft = new_soft
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(0, min(wanted, soft - FD_RESERVE))


def _raw_json_response(status: int, reason: str, message: str, code: str,
                       retry_after: int | None = None) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "server_error", "param": None,
                                 "code": code}}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close"]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_FULL = _raw_json_response(
    503, "Service Unavailable",
    "the server has reached its connection limit and every connection is busy; retry shortly",
    "too_many_connections", retry_after=1,
)
_HEAD_TIMEOUT = _raw_json_response(
    408, "Request Timeout", "the request head did not arrive in time", "request_timeout",
)


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with request deadlines and a connection cap (see the module doc)."""

    limits: ConnectionLimits = ConnectionLimits()
    _deadline: asyncio.TimerHandle | None = None
    _phase: str = "head"  # "head" | "body" | "app": what the deadline is waiting for
    _opened: float = 0.0
    _last_byte: float = 0.0  # loop time of the last byte received (0: none yet)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._opened = self.loop.time()
        if len(self.connections) > self.limits.max_connections and not self._evict_one():
            log.warning("connection limit (%d) reached with every connection busy; "
                        "refusing %s", self.limits.max_connections, self.client)
            transport.write(_FULL)
            transport.close()
            return
        self._arm("head", self.limits.header_timeout)

    def _evict_one(self) -> bool:
        """Close one connection that is not being answered; False when none may be closed.

        Order: silent sockets older than FRESH_GRACE (oldest first: a half-open flood), then
        younger silent sockets, *youngest* first (a burst of new sockets pushes out its own
        latest members, not a probe that connected just before it and is not read yet),
        then connections that sent something and wait (least recently active first:
        keep-alive pauses, slow heads, which the head deadline bounds anyway). A newcomer is
        never refused while any connection may be closed: sparing young sockets outright
        would let a continuous flood lock every probe out.
        """
        now = self.loop.time()
        best: tuple[int, float] | None = None
        victim: GuardedH11Protocol | None = None
        for c in self.connections:
            if not isinstance(c, GuardedH11Protocol) or c is self or not c._idle():
                continue
            if c._last_byte != 0.0:
                rank = (2, c._last_byte)
            elif now - c._opened >= FRESH_GRACE:
                rank = (0, c._opened)
            else:
                rank = (1, -c._opened)
            if best is None or rank < best:
                best, victim = rank, c
        if victim is None:
            return False
        log.info("connection limit (%d) reached: closing idle/slow connection from %s",
                 self.limits.max_connections, victim.client)
        victim._close()
        return True

    def _idle(self) -> bool:
        # Waiting for (the rest of) a request: no application task depends on this socket.
        return not self.transport.is_closing() and (self.cycle is None or
                                                    self.cycle.response_complete)

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        log.info("closing connection from %s: request %s not received within %g s",
                 self.client, self._phase,
                 self.limits.header_timeout if self._phase == "head" else
                 self.limits.body_timeout)
        if self._phase == "head" and self.conn.their_state is h11.IDLE:
            self.transport.write(_HEAD_TIMEOUT)
        self._close()

    def _close(self) -> None:
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            # The application is still reading the body: it sees a disconnect, not a hang.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._last_byte = self.loop.time()
        if self._deadline is None and self._phase == "head":
            # The first byte after a response (keep-alive pause, or the rest of a body the
            # application never read) starts the clock again: uvicorn's keep-alive timer
            # stops at any byte, so without this a trickling client would hold on for ever.
            self._arm("head", self.limits.header_timeout)
        super().data_received(data)
        self._track()

    def _track(self) -> None:
        state = self.conn.their_state
        if state is h11.SEND_BODY and self._phase == "head":
            self._arm("body", self.limits.body_timeout)
        elif state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR) and self._phase != "app":
            # The whole request is in: from here on only the response runs.
            self._disarm()
            self._phase = "app"

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Keep-alive (uvicorn's timer) takes over until the next request's first byte.
        self._disarm()
        self._phase = "head"

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A protocol class bound to ``limits`` (uvicorn instantiates it per connection)."""
    return type("EdgepackH11Protocol", (GuardedH11Protocol,), {"limits": limits})


def uvicorn_options(limits: ConnectionLimits) -> dict[str, Any]:
    """The uvicorn.Config arguments that go with ``guarded_protocol(limits)``."""
    return {
        "http": guarded_protocol(limits),
        "timeout_keep_alive": max(1, round(limits.keep_alive)),
        "h11_max_incomplete_event_size": limits.max_header_bytes,
    }
