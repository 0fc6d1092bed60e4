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
- a *connection cap*: past ``max_connections`` open connections, a new one first closes
  connections that are not being answered (silent sockets older than ``FRESH_GRACE`` first,
  then keep-alive pauses and slow heads; see ``_make_room``), so a health probe gets in.
  Sockets that connected less than ``FRESH_GRACE`` ago and sent nothing yet are never closed
  for room below a ceiling (``BURST`` x the cap, within the descriptor limit): a probe whose
  ``connect`` returned before its ``send`` (a loaded machine) looks exactly like a flood
  socket until then. Only when every connection is busy with a response does the newcomer
  get an OpenAI-shaped 503 and a close.

A connection whose deadline passes is closed (a 408 when the head never completed); the
response of a request in progress is never cut by these deadlines, so long SSE streams are
unaffected. Device side: standard library (``fcntl``, ``termios``: Linux/macOS), h11 and uvicorn
only.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import resource
import struct
import termios
from dataclasses import dataclass, replace
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("edgepack.serve")

# File descriptors the process needs besides client sockets: the model (mmap keeps one),
# the listening socket, logs, the notify socket, onnxruntime/llama.cpp threads' files.
FD_RESERVE = 64
# A socket that has sent nothing for less than this may be a client that connected and has
# not been scheduled to send its request yet (a health probe on a loaded machine): it is not
# closed to make room while the connection count is under the ceiling (BURST x the cap).
FRESH_GRACE = 2.0
BURST = 4


@dataclass(frozen=True)
class ConnectionLimits:
    """The bounds one server applies to every client connection."""

    max_connections: int = 256
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive: float = 5.0
    max_header_bytes: int = 16 * 1024
    ceiling: int = 1024  # most sockets held at once (fresh silent ones over the cap)


def fd_budget(wanted: int) -> int:
    """The connection cap that fits the file-descriptor limit, raising the soft limit first.

    Raises the soft ``RLIMIT_NOFILE`` towards the hard one (as Go's runtime and nginx's
    ``worker_rlimit_nofile`` do) far enough for a burst (``BURST`` x ``wanted`` sockets),
    then returns ``wanted``, or less where the limit cannot hold that burst: half of what
    the descriptors allow, so that a flood of fresh sockets has room over the cap (see
    ``ceiling``) and the server's own descriptors (``FD_RESERVE``) are never exhausted.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = BURST * wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < target:
        new_soft = target if hard == resource.RLIM_INFINITY else min(target, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
            soft = new_soft
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= target:
        return wanted
    return max(0, min(wanted, (soft - FD_RESERVE) // 2))


def burst_ceiling(cap: int) -> int:
    """How many connections may be open at once: fresh silent sockets may take the cap up to
    ``BURST`` x ``cap``, within the descriptors the current soft limit leaves."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = BURST * cap if soft == resource.RLIM_INFINITY else soft - FD_RESERVE
    return max(cap, min(BURST * cap, room))


def _bytes_waiting(transport: asyncio.BaseTransport) -> bool:
    """Whether the kernel holds received bytes on this connection that were not read yet."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.fileno() < 0:
        return False
    try:
        buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return False
    return struct.unpack("i", buf)[0] > 0


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
        if len(self.connections) > self.limits.max_connections and not self._make_room():
            log.warning("connection limit (%d) reached with every connection busy; "
                        "refusing %s", self.limits.max_connections, self.client)
            transport.write(_FULL)
            transport.close()
            return
        self._arm("head", self.limits.header_timeout)

    def _make_room(self) -> bool:
        """Close connections that are not being answered until the cap holds again, as far
        as the rules allow; False when the newcomer must be refused.

        A silent socket (nothing received, nothing waiting in the kernel) is closed once it
        is FRESH_GRACE old, oldest first: the half-open flood. A younger one may be a client
        that has not been scheduled to send yet (a probe on a loaded machine, whose
        ``connect`` returned before its ``send``), so while such sockets are all that could
        be closed, the newcomer is let in over the cap, up to the ceiling (``BURST`` x the
        cap, within the descriptor limit); the next newcomer after the grace, or the head
        deadline, brings the count back down. With no silent socket at all, the connection
        that has waited longest since its last byte goes (keep-alive pauses, slow heads).
        At the ceiling the oldest of the young silent sockets goes: it has had the longest to
        send, and a probe that connected during the burst gets the most time before it is
        next (one run each of 360 probes in 300-socket floods against a ceiling of 128:
        youngest first lost 1, oldest first none; too few to rank them by, the time is the
        reason). Received bytes are asked of the kernel (``FIONREAD``), not of our own
        reads: when a burst is accepted every ``connection_made`` runs before any
        ``data_received``, so a request that has arrived is not yet seen here. Only when
        every connection is busy with a response is the newcomer refused.
        """
        live = [c for c in self.connections
                if isinstance(c, GuardedH11Protocol) and not c.transport.is_closing()]
        excess = len(live) - self.limits.max_connections
        if excess <= 0:
            return True
        now = self.loop.time()
        idle = [c for c in live if c is not self and c._idle()]
        silent = sorted((c for c in idle if c._last_byte == 0.0), key=lambda c: c._opened)
        ripe = [c for c in silent if now - c._opened >= FRESH_GRACE]
        fresh = [c for c in silent if now - c._opened < FRESH_GRACE]
        closed = 0
        for c in ripe:
            if closed == excess:
                break
            if not _bytes_waiting(c.transport):
                c._evict()
                closed += 1
        if closed or (fresh and len(live) <= self.limits.ceiling):
            return True
        victim = None
        if len(live) > self.limits.ceiling:
            victim = next((c for c in fresh if not _bytes_waiting(c.transport)), None)
        if victim is None:
            talking = [c for c in idle if c._last_byte != 0.0]
            if not talking:
                return False
            victim = min(talking, key=lambda c: c._last_byte)
        victim._evict()
        return True

    def _evict(self) -> None:
        log.info("connection limit (%d, %d in a burst) reached: closing %s connection from %s "
                 "(open %.1f s)", self.limits.max_connections, self.limits.ceiling,
                 "silent" if self._last_byte == 0.0 else "idle/slow", self.client,
                 self.loop.time() - self._opened)
        self._close()

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
    bounded = replace(limits, ceiling=burst_ceiling(limits.max_connections))
    return type("EdgepackH11Protocol", (GuardedH11Protocol,), {"limits": bounded})


def uvicorn_options(limits: ConnectionLimits) -> dict[str, Any]:
    """The uvicorn.Config arguments that go with ``guarded_protocol(limits)``."""
    return {
        "http": guarded_protocol(limits),
        "timeout_keep_alive": max(1, round(limits.keep_alive)),
        "h11_max_incomplete_event_size": limits.max_header_bytes,
    }
