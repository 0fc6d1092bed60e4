"""The long-running agent: cycles at an interval, retries failures with jittered exponential
backoff inside that interval, logs with time and level, and stops cleanly on SIGTERM.

Backoff: after the n-th failure in a row the agent waits ``min(interval, retry_min * 2**(n-1))``
scaled by a random factor in [0.5, 1] ("equal jitter", so a fleet that lost its repository
at the same moment does not come back at the same second:
https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/). A success returns
to the full interval.

Logs: ``2026-11-30T03:18:15+0000 INFO message`` on a terminal or in a file; under systemd
(``JOURNAL_STREAM`` set) the journal stamps the time itself, so lines carry only the
``<N>`` syslog priority prefix it understands (sd-daemon(3)).

Device side: standard library only.
"""

from __future__ import annotations

import logging
import random
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("edgepack.agent")

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class AgentStopped(BaseException):
    """SIGTERM/SIGINT arrived during a cycle: unwind it (the journal makes that safe) and
    exit 0. A BaseException so no ``except Exception`` on the way swallows it."""


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def setup_logging(environ: Mapping[str, str], *, verbose: bool = False,
                  stream: Any = None) -> logging.Handler:
    """Send edgepack's agent log lines to stderr, journal-friendly; returns the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                               "%Y-%m-%dT%H:%M:%S%z"))
    root = logging.getLogger("edgepack")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    return handler


def remove_logging(handler: logging.Handler) -> None:
    logging.getLogger("edgepack").removeHandler(handler)


def backoff_delay(failures: int, interval: float, retry_min: float,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait after ``failures`` failures in a row (0: a success -> interval)."""
    if failures <= 0:
        return interval
    ceiling = min(interval, retry_min * 2 ** min(failures - 1, 30))
    return ceiling * (rng or random).uniform(0.5, 1.0)


class StopSignal:
    """SIGTERM/SIGINT handling: during a wait the wait ends; during a cycle the cycle is
    unwound with AgentStopped."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.in_cycle = False
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self.event.set()
        if self.in_cycle:
            raise AgentStopped(signal.Signals(signum).name)

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if a stop was requested."""
        return self.event.wait(max(seconds, 0.0))


def run_forever(cycle: Callable[[], Any], on_error: Callable[[BaseException], None], *,
                interval: float, retry_min: float, stop: StopSignal,
                rng: random.Random | None = None) -> None:
    """Run ``cycle`` until ``stop``; failures (exceptions other than AgentStopped) are
    passed to ``on_error`` and retried with backoff."""
    failures = 0
    while not stop.event.is_set():
        stop.in_cycle = True
        try:
            cycle()
            failures = 0
        except AgentStopped:
            break
        except Exception as e:  # noqa: BLE001 - the loop must survive any one cycle
            failures += 1
            on_error(e)
        finally:
            stop.in_cycle = False
        delay = backoff_delay(failures, interval, retry_min, rng)
        if failures:
            log.warning("retrying in %.1f s (failure %d in a row)", delay, failures)
        else:
            log.debug("next check in %.0f s", delay)
        if stop.wait(delay):
            break
    log.info("stopped (%s)", signal.Signals(stop.signum).name if stop.signum else "done")
