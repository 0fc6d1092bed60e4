"""One OS thread that owns the engine.

Why a dedicated thread (measured, issue #5): llama.cpp's CPU backend runs each decode on an
OpenMP thread team that belongs to the calling OS thread, and idle teams busy-wait for a
while before they sleep. When successive decodes come from different threads (asyncio's
default executor, a thread per request) the old team still spins on the cores the new one
needs, and decode speed halves (about 108 → 58 tok/s for SmolLM2-135M on 2 cores). So the
engine is loaded, warmed up and driven by this one thread only, and results travel back to
the event loop with ``call_soon_threadsafe``.

Jobs run in submission order, one at a time: that is also the server's FIFO request queue.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_STOP = object()
_END = object()


class WorkerClosed(RuntimeError):
    """The worker thread has stopped; no more jobs run."""


class EngineWorker:
    """Run callables and generators on one dedicated thread, await them from asyncio."""

    def __init__(self, name: str = "edgepack-engine") -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            job()

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn()`` on the worker; the returned future resolves on the calling loop."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if fut.done():
                return
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

        def job() -> None:
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
                _post(loop, settle, False, e)
            else:
                _post(loop, settle, True, result)

        self._put(job)
        return fut

    def call_blocking(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the worker and wait for it from a plain (non-asyncio) thread."""
        done = threading.Event()
        box: list[Any] = []

        def job() -> None:
            try:
                box.append((True, fn()))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                box.append((False, e))
            done.set()

        self._put(job)
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def stream(self, make: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
        """Queue ``make()`` on the worker now; iterate its items on the event loop.

        The generator is created and exhausted on the worker thread; items arrive in order.
        The job is queued at once (not at first iteration), so the caller's bookkeeping in
        ``make`` runs even if nobody iterates. Abandoning the iterator does not stop the
        worker's loop: callers stop generation with the engine's CancelToken.
        """
        job, items = _piped(make)
        self._put(job)
        return items

    def _put(self, job: Any) -> None:
        if self._closed:
            raise WorkerClosed("the engine worker has stopped")
        self._jobs.put(job)

    def close(self, timeout: float | None = None) -> None:
        """Let queued jobs finish, then stop the thread (waits up to ``timeout``)."""
        if not self._closed:
            self._closed = True
            self._jobs.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


def stream_in_thread(
    make: Callable[[], Iterator[T]], name: str = "edgepack-stream"
) -> AsyncIterator[T]:
    """Like ``EngineWorker.stream``, on a thread of its own.

    For engines that decode on their own scheduler thread (``batch.py``) and only block the
    caller while waiting for tokens: one thread per admitted request, so requests in
    different slots do not wait for each other.
    """
    job, items = _piped(make)
    threading.Thread(target=job, name=name, daemon=True).start()
    return items


def _piped(make: Callable[[], Iterator[T]]) -> tuple[Callable[[], None], AsyncIterator[T]]:
    """A job that exhausts ``make()`` (on whatever thread runs it) and the async iterator
    that yields its items on the calling event loop, in order, re-raising its failure."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[Any] = asyncio.Queue()

    def job() -> None:
        try:
            for item in make():
                _post(loop, items.put_nowait, item)
        except BaseException as e:  # noqa: BLE001 - re-raised on the loop
            _post(loop, items.put_nowait, _Failure(e))
        _post(loop, items.put_nowait, _END)

    return job, _drain(items)


async def _drain(items: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    while True:
        item = await items.get()
        if item is _END:
            return
        if isinstance(item, _Failure):
            raise item.error
        yield item


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    # The loop may be gone (the server stopped while a job ran); the result has no reader.
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error
