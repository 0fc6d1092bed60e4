"""Bounded admission: ``slots`` requests on the engine, ``queue_size`` waiting, the rest 429.

The engine worker runs jobs in order (``worker.py``), so admission only has to count: a
request holds a ticket from admission until its response ends. All methods run on the event
loop thread; no locks needed.
"""

from __future__ import annotations

import math
import time

from edgepack.runtimes.metrics import ModelMetrics
from edgepack.runtimes.openai_schema import ApiError


class Ticket:
    """One admitted request. ``start()`` when the engine picks it up, ``release()`` at the end."""

    __slots__ = ("_admission", "_started", "_released", "admitted_at", "started_at")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._started = False
        self._released = False
        self.admitted_at = time.monotonic()
        self.started_at = 0.0

    def start(self) -> None:
        if not self._started and not self._released:
            self._started = True
            self.started_at = time.monotonic()
            self._admission._on_start(self)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._on_release(self)


class Admission:
    """Counts requests in the system and refuses those beyond 1 running + ``queue_size``."""

    def __init__(self, queue_size: int, metrics: ModelMetrics, slots: int = 1) -> None:
        self.capacity = slots + queue_size
        self.slots = slots
        self._metrics = metrics
        self._waiting = 0
        self._running = 0
        # Moving average of how long the engine holds a request, for Retry-After.
        self._service_s = 1.0

    @property
    def in_system(self) -> int:
        return self._waiting + self._running

    def enter(self) -> Ticket:
        """Admit a request or raise ApiError(429) with a Retry-After estimate."""
        if self.in_system >= self.capacity:
            self._metrics.rejected.labels("queue_full").inc()
            wait = max(1, math.ceil(self._service_s * (self._waiting + 1) / self.slots))
            raise ApiError(
                f"the server is busy: {self._running} request(s) running and {self._waiting} "
                f"waiting (queue size {self.capacity - self.slots}); retry after {wait} s",
                status=429,
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(wait)},
            )
        self._waiting += 1
        self._metrics.queue_depth.set(self._waiting)
        return Ticket(self)

    def _on_start(self, ticket: Ticket) -> None:
        self._waiting -= 1
        self._running += 1
        self._metrics.queue_depth.set(self._waiting)
        self._metrics.running.set(self._running)
        self._metrics.queue_wait.observe(ticket.started_at - ticket.admitted_at)

    def _on_release(self, ticket: Ticket) -> None:
        if ticket._started:
            self._running -= 1
            held = time.monotonic() - ticket.started_at
            self._service_s = 0.8 * self._service_s + 0.2 * held
        else:
            self._waiting -= 1
        self._metrics.queue_depth.set(self._waiting)
        self._metrics.running.set(self._running)
