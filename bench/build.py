"""bench/build: `edgepack build` against running the same converter and quantizer by hand.

Both sides convert the embedded SmolLM2-135M-Instruct (HF, fp32) to an f16 GGUF with the
same llama.cpp convert_hf_to_gguf.py and quantize it to Q8_0 with llama-cpp-python's
llama_model_quantize. edgepack also plans, hashes, validates (two model loads + a 200-token
scoring pass + a golden prompt) and writes the bundle; the table shows that work separately
so the overhead of the pipeline itself is visible.

Each run is a fresh process tree with a fresh edgepack cache (the converter source is shared
through EDGEPACK_LLAMA_CPP_DIR so no run pays for fetching it). Peak RSS is the largest
resident set of any process in the tree (getrusage RUSAGE_CHILDREN).

    .venv/bin/python bench/build.py [--reps 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "build.md"

_MEASURE = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"rc": p.returncode, "wall": wall, "rss": rss, "stderr": p.stderr[-20000:]}))
"""

_QUANTIZE = r"""
import ctypes, os, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.nthread = int(sys.argv[3])
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
rc = llama_cpp.llama_model_quantize(os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2]),
                                    ctypes.byref(params))
sys.exit(rc)
"""


def measured(cmd: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, *cmd], env=env, capture_output=True, text=True,
        check=True,
    )
    res = json.loads(out.stdout)
    if res["rc"] != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{res['stderr']}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    from edgepack.build.embedded import materialize
    from edgepack.build.gguf_convert import SCRIPT, ensure_converter

    model = materialize()
    source = ensure_converter()
    threads = os.cpu_count() or 1
    base_env = dict(os.environ, EDGEPACK_LLAMA_CPP_DIR=str(source.root), HF_HUB_OFFLINE="1")
    edgepack = str(Path(sys.executable).with_name("edgepack"))
    rows: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        rows.setdefault(key, []).append(value)

    for _ in range(args.reps):
        with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
            t = Path(tmp)
            # By hand: the converter, then the quantizer, as a user would run them.
            conv_env = dict(base_env, PYTHONPATH=str(source.root / "gguf-py"))
            c = measured(
                [sys.executable, str(source.root / SCRIPT), str(model), "--outfile",
                 str(t / "f16.gguf"), "--outtype", "f16"], conv_env,
            )
            q = measured(
                [sys.executable, "-c", _QUANTIZE, str(t / "f16.gguf"), str(t / "q8.gguf"),
                 str(threads)], base_env,
            )
            add("hand_convert", c["wall"])
            add("hand_quantize", q["wall"])
            add("hand_total", c["wall"] + q["wall"])
            add("hand_rss", max(c["rss"], q["rss"]))
            # edgepack, with a cache of its own.
            env = dict(base_env, EDGEPACK_HOME=str(t / "home"))
            e = measured(
                [edgepack, "build", str(model), "--device", "laptop-x86-16gb", "--quant", "Q8_0",
                 "--out", str(t / "out")], env,
            )
            stages = {m[0]: float(m[1]) for m in re.findall(r"· (\w+): ([\d.]+) s", e["stderr"])}
            add("ep_convert", stages["convert"])
            add("ep_quantize", stages["quantize"])
            add("ep_validate", stages["validate"])
            add("ep_total", e["wall"])
            add("ep_without_validate", e["wall"] - stages["validate"])
            add("ep_rss", e["rss"])
            same = (t / "q8.gguf").read_bytes() == next((t / "out").rglob("*.gguf")).read_bytes()
            add("identical_output", float(same))

    med = {k: statistics.median(v) for k, v in rows.items()}
    mib = 2**20
    table = [
        "| step | by hand | edgepack | ratio |",
        "|---|---:|---:|---:|",
        f"| convert HF → f16 GGUF (s) | {med['hand_convert']:.1f} | {med['ep_convert']:.1f} | "
        f"{med['ep_convert'] / med['hand_convert']:.2f} |",
        f"| quantize → Q8_0 (s) | {med['hand_quantize']:.1f} | {med['ep_quantize']:.1f} | "
        f"{med['ep_quantize'] / med['hand_quantize']:.2f} |",
        f"| whole run without validation (s) | {med['hand_total']:.1f} | "
        f"{med['ep_without_validate']:.1f} | "
        f"{med['ep_without_validate'] / med['hand_total']:.2f} |",
        f"| validation (s, edgepack only) | – | {med['ep_validate']:.1f} | – |",
        f"| whole run (s) | {med['hand_total']:.1f} | {med['ep_total']:.1f} | "
        f"{med['ep_total'] / med['hand_total']:.2f} |",
        f"| peak RSS (MiB) | {med['hand_rss'] / mib:.0f} | {med['ep_rss'] / mib:.0f} | "
        f"{med['ep_rss'] / med['hand_rss']:.2f} |",
    ]
    identical = all(v == 1.0 for v in rows["identical_output"])
    text = "\n".join(
        [
            "# bench/build — edgepack build vs the same converter + quantizer by hand",
            "",
            f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, "
            f"{platform.python_implementation()} {platform.python_version()}",
            "- model: SmolLM2-135M-Instruct (embedded default, fp32 safetensors) → f16 → Q8_0",
            f"- medians of {args.reps} runs; command: `.venv/bin/python bench/build.py "
            f"--reps {args.reps}`",
            f"- quantized file byte-identical to the hand-made one: {identical}",
            "",
            *table,
            "",
        ]
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)
    shutil.rmtree(HERE / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    main()
