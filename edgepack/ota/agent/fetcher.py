"""HTTP downloads for the agent: a total deadline, byte limits and Range resume.

ngclient's socket timeout is only a gap timeout: a server that trickles a byte every few
seconds held it for 30 s and more (issue #6). Here every download shares one deadline for the
whole update, each read returns after at most one socket read (``read1``) so the deadline is
checked between reads, and a server that sends more than the signed length is cut off.

Device side: urllib3, tuf.ngclient and the standard library only.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.ngclient.fetcher import FetcherInterface

from edgepack.errors import FetchError, IntegrityError

_READ = 64 * 1024


class DeadlineExceeded(FetchError):
    """The update ran past its total deadline (a stalled or trickling server)."""


@dataclass
class Deadline:
    """A point in monotonic time after which no more bytes are awaited."""

    seconds: float
    started: float = field(default_factory=time.monotonic)

    def remaining(self) -> float:
        return self.started + self.seconds - time.monotonic()

    def check(self, what: str) -> float:
        left = self.remaining()
        if left <= 0:
            raise DeadlineExceeded(
                f"update deadline of {self.seconds:g} s passed while fetching {what}",
                hint="the repository server is stalled or too slow; the agent retries at the "
                "next interval (raise --deadline for slow links)",
            )
        return left


class Progress:
    """Download progress in the log every ``every`` seconds: bytes, rate and, when the
    expected total is known, percent and ETA (an OTA download of 100+ MB must not be silent
    for minutes)."""

    def __init__(self, what: str, *, every: float = 5.0,
                 logger: logging.Logger | None = None) -> None:
        self.what = what
        self.every = every
        self.log = logger or logging.getLogger("edgepack.agent")
        self.total: int | None = None
        self.got = 0
        self.started = time.monotonic()
        self._last = self.started

    def expect(self, total: int) -> None:
        self.total = total

    def add(self, n: int) -> None:
        self.got += n
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self.log.info("downloading %s: %s", self.what, self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.started, 1e-6)
        rate = self.got / elapsed
        text = f"{_mib(self.got)}"
        if self.total:
            text += f" of {_mib(self.total)} ({min(100.0, 100 * self.got / self.total):.0f}%)"
        text += f", {_mib(rate)}/s"
        if self.total and rate > 0 and self.total > self.got:
            text += f", ETA {(self.total - self.got) / rate:.0f} s"
        return text

    def done(self) -> None:
        if self.got:
            self.log.info("downloaded %s: %s in %.1f s", self.what,
                          _mib(self.got), time.monotonic() - self.started)


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


@dataclass
class Traffic:
    """Bytes received, for status and benchmarks."""

    bytes: int = 0
    requests: int = 0


class HttpFetcher:
    """GET with a shared deadline, a gap timeout, a byte limit per file and Range resume."""

    def __init__(self, deadline: Deadline, *, gap_timeout: float = 15.0,
                 user_agent: str = "edgepack-agent") -> None:
        self.deadline = deadline
        self.gap_timeout = gap_timeout
        self.traffic = Traffic()
        self.progress: Progress | None = None
        self._pool = urllib3.PoolManager(
            headers={"User-Agent": user_agent}, retries=False, maxsize=2
        )

    def close(self) -> None:
        self._pool.clear()

    def _open(self, url: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        left = self.deadline.check(url)
        timeout = urllib3.Timeout(connect=min(self.gap_timeout, left),
                                  read=min(self.gap_timeout, left))
        try:
            resp = self._pool.request("GET", url, headers=headers, preload_content=False,
                                      timeout=timeout, redirect=False)
        except urllib3.exceptions.HTTPError as e:
            self.deadline.check(url)
            raise FetchError(f"cannot fetch {url}: {e}",
                             hint="check --repo-url and the network") from e
        self.traffic.requests += 1
        return resp

    def stream(self, url: str, max_length: int, headers: dict[str, str] | None = None
               ) -> Iterator[bytes]:
        """Yield the body of ``url``; raises FetchError on HTTP errors or a passed deadline
        and IntegrityError when the body exceeds ``max_length`` bytes."""
        resp = self._open(url, headers or {})
        try:
            if resp.status >= 400:
                raise FetchError(f"GET {url}: HTTP {resp.status}",
                                 hint="the repository is incomplete or the URL is wrong")
            yield from self._body(resp, url, max_length)
        finally:
            resp.release_conn()

    def _body(self, resp: urllib3.BaseHTTPResponse, url: str, max_length: int
              ) -> Iterator[bytes]:
        got = 0
        while True:
            self.deadline.check(url)
            try:
                block = resp.read1(_READ)
            except urllib3.exceptions.HTTPError as e:
                self.deadline.check(url)
                raise FetchError(f"download of {url} broke off: {e}") from e
            if not block:
                return
            got += len(block)
            self.traffic.bytes += len(block)
            if self.progress is not None:
                self.progress.add(len(block))
            if got > max_length:
                raise IntegrityError(
                    f"{url} sent more than the {max_length} bytes its signed metadata allows",
                    hint="the repository or a proxy serves a wrong file; it was rejected",
                )
            yield block

    def download_to(self, url: str, dest: Path, length: int) -> None:
        """Fetch ``url`` into ``dest`` (exactly ``length`` bytes), resuming ``dest.part``.

        A partial ``.part`` file left by a killed or timed-out run is continued with an HTTP
        Range request; a server that ignores Range (200) restarts it. The caller verifies
        the hash. Raises FetchError/IntegrityError as ``stream`` does, and when the body is
        shorter than ``length``.
        """
        part = dest.with_name(dest.name + ".part")
        have = part.stat().st_size if part.exists() else 0
        if have > length:
            part.unlink()
            have = 0
        headers = {"Range": f"bytes={have}-"} if 0 < have < length else {}
        if have == length:
            os.replace(part, dest)
            return
        resp = self._open(url, headers)
        try:
            if resp.status >= 400:
                raise FetchError(f"GET {url}: HTTP {resp.status}",
                                 hint="the repository is incomplete or the URL is wrong")
            mode = "ab" if resp.status == 206 and have else "wb"
            start = have if mode == "ab" else 0
            try:
                with open(part, mode) as f:
                    for block in self._body(resp, url, length - start):
                        f.write(block)
                    f.flush()
                    os.fsync(f.fileno())
            except IntegrityError:
                # The server sent more than the signed length: what it sent is not the file,
                # so nothing of it may be resumed from next time (a cut connection, a
                # FetchError, keeps its partial).
                part.unlink(missing_ok=True)
                raise
        finally:
            resp.release_conn()
        size = part.stat().st_size
        if size != length:
            raise FetchError(f"{url}: got {size} bytes, expected {length}",
                             hint="the download was cut short; the agent resumes it next time")
        os.replace(part, dest)

    def download_bytes(self, url: str, max_length: int) -> bytes:
        return b"".join(self.stream(url, max_length))


class TufFetcher(FetcherInterface):
    """ngclient's one-method fetcher interface over ``HttpFetcher`` (same deadline)."""

    def __init__(self, http: HttpFetcher) -> None:
        self.http = http

    def _fetch(self, url: str) -> Iterator[bytes]:
        resp = self.http._open(url, {})
        if resp.status >= 400:
            resp.release_conn()
            raise tuf_exc.DownloadHTTPError(f"HTTP {resp.status} for {url}", resp.status)
        return self._chunks(resp, url)

    def _chunks(self, resp: urllib3.BaseHTTPResponse, url: str) -> Iterator[bytes]:
        try:
            # ngclient enforces the metadata length itself; 64 MiB only bounds the stream.
            yield from self.http._body(resp, url, 64 << 20)
        finally:
            resp.release_conn()
