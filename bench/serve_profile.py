"""Where each server's CPU time goes while it decodes: edgepack serve vs llama-server.

Starts the servers of ``bench/serve.py`` (same GGUF, threads, context, slots), then for each in
alternating rounds streams ``--streams`` concurrent greedy completions of ``--tokens`` tokens
while ``perf record`` samples the server process, and sums the samples by shared object:
llama.cpp's kernels (libggml*, libllama, or the llama-server binary that links them
statically), OpenMP's thread team (libgomp: barriers and the spin after each graph), the
Python interpreter and its extensions, and the rest; shares of the server's own samples. A
server whose share outside the kernels is larger spends that CPU on serving, not decoding.

    python bench/serve_profile.py [--gguf FILE] [--streams 1] [--tokens 400] [--reps 3]

Needs Linux ``perf`` (Debian: linux-perf) and root or ``perf_event_paranoid`` <= 0 (it samples
every CPU and keeps the server's samples).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve as bench  # noqa: E402 - bench/serve.py, beside this file

GROUPS = ("llama.cpp kernels", "OpenMP team", "Python", "other")


def _group(dso: str) -> str:
    name = Path(dso.strip("[]")).name
    if name.startswith(("libggml", "libllama", "llama-server")):
        return "llama.cpp kernels"
    if name.startswith("libgomp"):
        return "OpenMP team"
    if name.startswith(("libpython", "python")) or ".cpython-" in name:
        return "Python"
    return "other"  # libc, libm, the kernel (where perf may sample it), ...


def profile_once(t: bench.Target, streams: int, tokens: int, out: Path) -> dict[str, float]:
    """Shares of the server's samples (percent by group) and the streams' tok/s."""
    assert t.proc is not None
    # System-wide sampling, then the server's samples: following the process (-p) gives
    # each new thread perf events of its own, and edgepack starts a thread per request;
    # with that, its 4-stream decode ran 4x slower in some rounds, and without perf never.
    rec = subprocess.Popen(["perf", "record", "-a", "-F", "999", "-o", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # perf attaches
    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        got = list(pool.map(lambda i: bench._stream(
            t, bench._nonce() + f"Write a long story about cat number {i}:", tokens),
            range(streams)))
    wall = time.perf_counter() - t0
    rec.send_signal(2)
    rec.wait(60)
    report = subprocess.run(["perf", "report", "-i", str(out), "--pid", str(t.proc.pid),
                             "--sort", "dso", "--stdio", "-g", "none", "--percent-limit", "0"],
                            capture_output=True, text=True, check=True).stdout
    shares: dict[str, float] = collections.defaultdict(float)
    for line in report.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].endswith("%"):
            shares[_group(parts[1])] += float(parts[0].rstrip("%"))
    total = sum(shares.values()) or 1.0  # perf's percentages are of every CPU's samples
    result = {g: 100 * shares.get(g, 0.0) / total for g in GROUPS}
    result["tok/s"] = sum(n for _, _, n in got) / wall
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--llama-server", type=Path, default=bench.CACHE / "llama-server")
    args = ap.parse_args()
    if shutil.which("perf") is None:
        raise SystemExit("perf is not installed (Debian: apt-get install linux-perf)")
    if not args.llama_server.is_file():
        raise SystemExit(f"{args.llama_server} missing: sh bench/build_llama_server.sh")
    gguf = args.gguf or bench._default_gguf()
    rows: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="edgepack-profile-") as tmp:
        targets = [bench.llama_server_target(args.llama_server, gguf, args.threads, args.ctx,
                                             args.parallel),
                   bench.edgepack_target(gguf, args.threads, args.ctx, Path(tmp),
                                         args.parallel)]
        try:
            for t in targets:
                t.start()
                bench._stream(t, bench._nonce() + "Hello", 4)
            for r in range(args.reps):
                for t in (targets if r % 2 == 0 else targets[::-1]):
                    got = profile_once(t, args.streams, args.tokens,
                                       Path(tmp) / f"{t.name}-{r}.data")
                    print(f"round {r + 1}/{args.reps} {t.name}: " + ", ".join(
                        f"{k} {v:.1f}" for k, v in got.items()), file=sys.stderr, flush=True)
                    rows[t.name].append(got)
        finally:
            for t in targets:
                t.stop()
    print(f"# CPU samples by shared object, {gguf.name}, {args.streams} stream(s) of "
          f"{args.tokens} tokens, {args.threads} threads, {args.parallel} slots; medians "
          f"(min–max) of {args.reps} alternating rounds\n")
    cols = (*GROUPS, "tok/s")
    print("| server | " + " | ".join(f"{c} (%)" if c in GROUPS else c for c in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, rs in rows.items():
        cells = []
        for c in cols:
            v = [r[c] for r in rs]
            cells.append(f"{statistics.median(v):.1f} ({min(v):.1f}–{max(v):.1f})")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
