"""Soak `edgepack serve` with mixed hostile traffic on loopback; report RSS, fds and /healthz.

One real server (SmolLM2-135M-Instruct Q4_1, llama.cpp, the shipped GGUF) on 127.0.0.1 with
its default limits, under a file-descriptor limit of 1024 (systemd's default soft limit), for
``--seconds`` (default 600), while these run side by side:

- generations: completions (16 tokens), half of them streamed, every fourth stream dropped
  after its first chunk (a client disconnect);
- generation bursts: 12 requests at once every 10 s (the queue holds 8: the rest get 429);
- slow clients: 40 sockets trickling a header one byte a second (slowloris);
- half-open floods: 300 sockets opened and left silent every 20 s;
- stalled bodies: 20 POSTs announcing 1 MB, sending 8 KiB and stalling, every 15 s;
- random paths: GET /v1/<random>, one thread, ~100-200 a second (metrics-label attack);
- a prober (own process): GET /healthz every 100 ms on a fresh connection, 5 s timeout.

RSS and open descriptors of the server are sampled every 5 s; the report gives them at the
start (after warm-up), the maximum, and the end (after the traffic stopped and 15 s settled),
with /healthz latency percentiles and the /metrics size. It stops by itself; every socket it
opens is to 127.0.0.1. One run (a stability check, not a speed comparison).

    python bench/soak.py [--seconds 600] [--out bench/results/soak.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import random
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
MODEL = "smollm2-135m-instruct"
# Bounds the report checks (a leak shows as growth past them over the run).
RSS_GROWTH_BOUND = 64 * 2**20
FD_GROWTH_BOUND = 16


def _fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def start_server(bundle: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgepack", "serve", str(bundle), "--port", "0",
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=open(log, "wb"), preexec_fn=_fd_limit,  # noqa: SIM115
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"server did not start: {line!r}\n{log.read_text()[-2000:]}")
    url = f"http://127.0.0.1:{m.group(1)}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server not ready after 120 s")


class Soak:
    def __init__(self, url: str, seconds: float) -> None:
        self.url = url
        host, port = url.removeprefix("http://").split(":")
        self.addr = (host, int(port))
        self.stop = threading.Event()
        self.until = time.monotonic() + seconds
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.health_ms: list[float] = []
        self.health_failures: dict[str, int] = {}

    def count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def running(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.until

    # -- traffic --------------------------------------------------------------------------

    def generations(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as c:
            i = 0
            while self.running():
                i += 1
                body = {"model": MODEL, "prompt": f"{uuid.uuid4().hex[:6]} Once upon a time",
                        "max_tokens": 16, "temperature": 0.7}
                try:
                    if i % 2:
                        r = c.post("/v1/completions", json=body)
                        self.count(f"generation {r.status_code}")
                        continue
                    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                        for n, _ in enumerate(r.iter_lines()):
                            if i % 8 == 0 and n == 0:
                                self.count("stream dropped mid-way")
                                break
                        else:
                            self.count(f"stream {r.status_code}")
                except httpx.HTTPError as e:
                    self.count(f"generation error {type(e).__name__}")

    def bursts(self) -> None:
        while self.running():
            threads = [threading.Thread(target=self._one_burst_request) for _ in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.stop.wait(10)

    def _one_burst_request(self) -> None:
        try:
            r = httpx.post(self.url + "/v1/completions", timeout=120,
                           json={"model": MODEL, "prompt": "Count: one, two,", "max_tokens": 8})
            self.count(f"burst {r.status_code}")
        except httpx.HTTPError as e:
            self.count(f"burst error {type(e).__name__}")

    def slow_clients(self) -> None:
        socks: list[socket.socket] = []
        while self.running():
            while len(socks) < 40:
                try:
                    s = socket.create_connection(self.addr, timeout=5)
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                    socks.append(s)
                except OSError:
                    self.count("slow client connect refused")
                    break
            alive = []
            for s in socks:
                try:
                    s.sendall(b"X")
                    alive.append(s)
                except OSError:
                    self.count("slow client closed by server")
                    s.close()
            socks = alive
            self.stop.wait(1)
        for s in socks:
            s.close()

    def half_open_floods(self) -> None:
        held: list[socket.socket] = []
        while self.running():
            for s in held:
                s.close()
            held = []
            for _ in range(300):
                try:
                    held.append(socket.create_connection(self.addr, timeout=5))
                except OSError:
                    self.count("flood connect refused")
            self.count("flood of 300 sockets")
            self.stop.wait(20)
        for s in held:
            s.close()

    def stalled_bodies(self) -> None:
        held: list[socket.socket] = []
        while self.running():
            for s in held:
                s.close()
            held = []
            for _ in range(20):
                try:
                    s = socket.create_connection(self.addr, timeout=5)
                    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                              b"application/json\r\nContent-Length: 1000000\r\n\r\n"
                              + b" " * 8192)
                    held.append(s)
                except OSError:
                    self.count("stalled body refused")
            self.count("20 stalled bodies")
            self.stop.wait(15)
        for s in held:
            s.close()

    def random_paths(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as c:
            while self.running():
                try:
                    r = c.get(f"/v1/{uuid.uuid4().hex}/{random.randint(0, 10**9)}")
                    self.count(f"random path {r.status_code}")
                    time.sleep(0.005)  # ~100-200/s: an attack, not a CPU race with the server
                except httpx.HTTPError as e:
                    self.count(f"random path error {type(e).__name__}")

    def prober(self) -> None:
        # In a process of its own, so the traffic threads' GIL never delays its clock.
        with multiprocessing.Pool(1) as pool:
            ms, failures = pool.apply(probe_healthz, (self.url, self.until))
        with self.lock:
            self.health_ms, self.health_failures = ms, failures


def probe_healthz(url: str, until: float) -> tuple[list[float], dict[str, int]]:
    """GET /healthz every 100 ms on a fresh connection until ``until`` (monotonic).

    Returns the latencies of the successes and the failures by kind."""
    ms_list: list[float] = []
    failures: Counter[str] = Counter()
    while time.monotonic() < until:
        t0 = time.perf_counter()
        try:
            status = httpx.get(url + "/healthz", timeout=5).status_code
            failure = "" if status == 200 else f"HTTP {status}"
        except httpx.HTTPError as e:
            failure = type(e).__name__
        ms = (time.perf_counter() - t0) * 1000
        if failure:
            failures[failure] += 1
        else:
            ms_list.append(ms)
        time.sleep(max(0.0, 0.1 - ms / 1000))
    return ms_list, dict(failures)


def sample(proc: psutil.Process) -> tuple[int, int]:
    return proc.memory_info().rss, proc.num_fds()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from support.bundles import make_test_bundle

    work = Path(tempfile.mkdtemp(prefix="edgepack-soak-"))
    bundle = make_test_bundle(work / "bundle", engine={"n_threads": 1})
    proc, url = start_server(bundle, work / "serve.log")
    ps = psutil.Process(proc.pid)
    metrics_start = len(httpx.get(url + "/metrics").content)
    rss0, fds0 = sample(ps)
    samples = [(0.0, rss0, fds0)]
    soak = Soak(url, args.seconds)
    workers = [soak.generations, soak.bursts, soak.slow_clients, soak.half_open_floods,
               soak.stalled_bodies, soak.random_paths, soak.prober]
    threads = [threading.Thread(target=w, daemon=True) for w in workers]
    t_start = time.monotonic()
    for t in threads:
        t.start()
    try:
        while soak.running():
            time.sleep(5)
            rss, fds = sample(ps)
            samples.append((time.monotonic() - t_start, rss, fds))
    finally:
        soak.stop.set()
        for t in threads:
            t.join(150)
    time.sleep(15)  # idle keep-alive and deadlines close what is left
    rss1, fds1 = sample(ps)
    metrics_end = len(httpx.get(url + "/metrics").content)
    alive = httpx.get(url + "/readyz", timeout=5).status_code
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(120)

    h = soak.health_ms
    rows = {
        "duration_s": round(time.monotonic() - t_start - 15, 1),
        "rss_start_mib": round(rss0 / 2**20, 1), "rss_max_mib": round(
            max(s[1] for s in samples) / 2**20, 1), "rss_end_mib": round(rss1 / 2**20, 1),
        "fds_start": fds0, "fds_max": max(s[2] for s in samples), "fds_end": fds1,
        "healthz_probes": len(h) + sum(soak.health_failures.values()),
        "healthz_failures": sum(soak.health_failures.values()),
        "healthz_failure_kinds": json.dumps(soak.health_failures) if soak.health_failures
        else "none",
        "healthz_p50_ms": round(statistics.median(h), 1) if h else None,
        "healthz_p99_ms": round(pct(h, 0.99), 1) if h else None,
        "healthz_max_ms": round(max(h), 1) if h else None,
        "metrics_bytes_start": metrics_start, "metrics_bytes_end": metrics_end,
        "readyz_after": alive, "exit_code": code,
    }
    verdict = {
        "rss growth within bound": rss1 - rss0 <= RSS_GROWTH_BOUND,
        "fd growth within bound": fds1 - fds0 <= FD_GROWTH_BOUND,
        "healthz never failed": not soak.health_failures,
        "metrics did not grow with random paths": metrics_end < 4 * metrics_start,
        "clean exit": code == 0,
    }
    lines = [
        f"# Soak: edgepack serve under mixed hostile traffic ({rows['duration_s']} s)", "",
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC · {platform.machine()} · "
        f"{os.cpu_count()} cores (shared with other work) · "
        f"`python bench/soak.py --seconds {args.seconds:g}` · one run", "",
        "| measure | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows.items()], "",
        f"Bounds: RSS growth ≤ {RSS_GROWTH_BOUND // 2**20} MiB, fd growth ≤ "
        f"{FD_GROWTH_BOUND}, no failed /healthz probe (5 s timeout).", "",
        "| check | result |", "|---|---|",
        *[f"| {k} | {'pass' if v else 'FAIL'} |" for k, v in verdict.items()], "",
        "Traffic (what each client class saw):", "",
        "| outcome | count |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(soak.counts.items())], "",
        "RSS / fds over time (s, MiB, fds): "
        + ", ".join(f"({t:.0f}, {r / 2**20:.0f}, {f})" for t, r, f in samples[::6]), "",
    ]
    report = "\n".join(lines)
    print(report)
    print(json.dumps({**rows, **verdict}))
    if args.out:
        args.out.write_text(report)
    return 0 if all(verdict.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
