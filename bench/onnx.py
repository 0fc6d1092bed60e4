"""ONNX path benchmark: MiniLM embeddings (PyTorch vs onnxruntime fp32/int8/fp16) and
SmolLM2-135M decode (onnxruntime int8/int4 vs llama.cpp GGUF).

Every measurement runs in a fresh subprocess (peak RSS is the child's own ru_maxrss).

    python bench/onnx.py [--work DIR] [--reps 15] [--out bench/results/onnx.md]

Builds its inputs with edgepack's own export/quantize functions into --work (cached).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder is sys.path[0], and this file is named onnx.py: it
# would shadow the onnx package that optimum and onnxruntime.quantization import.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT / "tests"))

# 8 sentences of roughly 32 tokens each (all-MiniLM-L6-v2's tokenizer).
BATCH = [
    "The committee met on Tuesday afternoon to discuss the new budget proposal, which includes "
    "funding for schools, roads and the public library system.",
    "After three days of heavy rain, the river rose above its banks and flooded several farms "
    "in the valley, forcing families to leave their homes.",
    "Researchers at the university have developed a small sensor that measures air quality "
    "and sends the readings to a phone every few minutes.",
    "The restaurant on the corner serves fresh pasta made every morning, and on weekends there "
    "is usually a long line of people waiting outside.",
    "To reset the router, hold the small button on the back for ten seconds until the lights "
    "blink, then wait two minutes for it to restart.",
    "The museum's new exhibition shows paintings and photographs from the early twentieth "
    "century, many of which have never been displayed before.",
    "Our team finished the project two weeks ahead of schedule, mostly because we automated "
    "the testing and deployment steps early on.",
    "Electric buses are becoming common in many cities, since they are quiet, cheap to run "
    "and produce no exhaust fumes in busy streets.",
]
PROMPT = "Here is a long story about a dragon who lived in the mountains. Once upon a time,"
DECODE_TOKENS = 64


def _rss_mb() -> float:
    # VmHWM, not ru_maxrss: on Linux ru_maxrss survives fork+exec, so every child would
    # report the parent's peak (the 3 GB of exporting SmolLM2).
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- children -------------------------------------------------------------------------------


def child_embed(variant: str, path: str, tok_dir: str, threads: int, reps: int) -> dict:
    import numpy as np

    if variant == "pytorch-fp32":
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        model = SentenceTransformer(path, device="cpu")

        def run():
            return model.encode(BATCH, batch_size=8)
    else:
        from edgepack.runtimes.onnx_engine import OnnxEngine, OnnxSettings

        engine = OnnxEngine(OnnxSettings(Path(path), Path(tok_dir), "bench", "embedding",
                                         n_threads=threads))
        engine.load()

        def run():
            return np.asarray(engine.embed(BATCH)[0])

    vecs = run()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return {"median_ms": statistics.median(times) * 1000, "vectors": np.asarray(vecs).tolist(),
            "rss_mb": _rss_mb()}


def child_decode(variant: str, path: str, tok_dir: str, threads: int) -> dict:
    if variant.startswith("gguf"):
        import llama_cpp

        llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=threads,
                              n_threads_batch=threads, verbose=False)
        llm.create_completion(PROMPT, max_tokens=2, temperature=0.0)  # warm-up
        t0 = time.perf_counter()
        t_first, n, text = 0.0, 0, ""
        for chunk in llm.create_completion(PROMPT, max_tokens=DECODE_TOKENS, temperature=0.0,
                                           stream=True):
            n += 1
            text += chunk["choices"][0]["text"]
            t_first = t_first or time.perf_counter()
        t_end = time.perf_counter()
        usage_n = n
    else:
        from edgepack.runtimes.engine import CancelToken, FinishEvent, SamplingParams
        from edgepack.runtimes.onnx_engine import OnnxEngine, OnnxSettings

        engine = OnnxEngine(OnnxSettings(Path(path), Path(tok_dir), "bench", "completion",
                                         n_threads=threads))
        engine.load()
        engine.warm_up()
        prompt = engine.prepare_completion(PROMPT)
        t0 = time.perf_counter()
        events = list(engine.generate(prompt, SamplingParams(max_tokens=DECODE_TOKENS,
                                                             temperature=0.0), CancelToken()))
        finish = events[-1]
        assert isinstance(finish, FinishEvent)
        usage_n = finish.completion_tokens
        t_first = t0 + finish.timings["prefill_s"]
        t_end = t_first + finish.timings["decode_s"]
        text = "".join(getattr(e, "text", "") for e in events[:-1])
    return {
        "tokens": usage_n,
        "decode_tok_s": (usage_n - 1) / max(t_end - t_first, 1e-9),
        "ttft_ms": (t_first - t0) * 1000,
        "rss_mb": _rss_mb(),
        "text": text[:60],
    }


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "child", *args], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- building the inputs -------------------------------------------------------------------


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()
                   and p.suffix in (".safetensors", ".bin"))
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def prepare(work: Path) -> dict:
    from support.models import build_smollm2, minilm_path, smollm2_gguf_path

    from edgepack.build.onnx_export import export_onnx
    from edgepack.build.onnx_quantize import quantize_onnx

    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"minilm": str(minilm_path()), "smollm2_gguf_q4_1": str(smollm2_gguf_path())}
    for name, src, task, schemes in (
        ("minilm", minilm_path(), "feature-extraction", ("fp32", "int8", "fp16")),
        ("smollm2", build_smollm2(), "text-generation", ("fp32", "int8", "int4")),
    ):
        exp = work / f"{name}-export"
        if not (exp / "model.onnx").is_file():
            export_onnx(src, exp, task)
        out[f"{name}_tok"] = str(exp / "tokenizer")
        out[f"{name}_src"] = str(src)
        for scheme in schemes:
            dst = work / f"{name}-{scheme}" / "model.onnx"
            if not dst.is_file():
                quantize_onnx(exp / "model.onnx", dst, scheme)
            out[f"{name}_{scheme}"] = str(dst)
    q8 = work / "smollm2-q8_0.gguf"
    if not q8.is_file():
        from support.smollm import quantize_gguf, write_f16_gguf

        f16 = write_f16_gguf(work / "smollm2-f16.gguf")
        quantize_gguf(f16, q8, "Q8_0")
        f16.unlink()
    out["smollm2_gguf_q8_0"] = str(q8)
    return out


# -- report --------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path,
                    default=Path.home() / ".cache" / "edgepack-bench-onnx")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "onnx.md")
    args = ap.parse_args()
    import numpy as np

    paths = prepare(args.work)
    embed_rows = []
    ref = None
    for variant, key in (("pytorch-fp32", "minilm"), ("ort-fp32", "minilm_fp32"),
                         ("ort-int8 (8-bit MatMulNBits)", "minilm_int8"),
                         ("ort-fp16", "minilm_fp16")):
        row = {"variant": variant, "size_mb": _size(Path(paths[key])) / 1e6}
        for threads in (1, 2):
            r = _child(["embed", variant, paths[key], paths["minilm_tok"], str(threads),
                        str(args.reps)])
            row[f"ms_{threads}t"] = r["median_ms"]
            row["rss_mb"] = r["rss_mb"]
            vecs = np.asarray(r["vectors"])
        if ref is None:
            ref = vecs
        cos = (vecs * ref).sum(1) / (np.linalg.norm(vecs, axis=1) * np.linalg.norm(ref, axis=1))
        row["cos_mean"], row["cos_min"] = float(cos.mean()), float(cos.min())
        embed_rows.append(row)
        print(row, flush=True)

    llm_rows = []
    for variant, key in (("ORT fp32", "smollm2_fp32"), ("ORT int8 (weight-only)", "smollm2_int8"),
                         ("ORT int4 (MatMulNBits)", "smollm2_int4"),
                         ("gguf Q8_0 (llama.cpp)", "smollm2_gguf_q8_0"),
                         ("gguf Q4_1 (llama.cpp)", "smollm2_gguf_q4_1")):
        kind = "gguf" if variant.startswith("gguf") else "onnx"
        r = _child(["decode", kind, paths[key], paths["smollm2_tok"], "2"])
        row = {"variant": variant, "size_mb": _size(Path(paths[key])) / 1e6, **r}
        llm_rows.append(row)
        print(row, flush=True)
    _write(args.out, embed_rows, llm_rows, args)


def _write(out: Path, embed_rows: list[dict], llm_rows: list[dict], args) -> None:
    import onnxruntime

    load = os.getloadavg()
    lines = [
        "# ONNX path benchmark",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"{platform.processor() or platform.platform()}; load average at the end "
        f"{load[0]:.1f}"
        + (" (other jobs shared the machine: treat latencies as rough)"
           if load[0] > (os.cpu_count() or 1) else " (the benchmark's own processes included)"),
        f"- onnxruntime {onnxruntime.__version__}, python {platform.python_version()}",
        f"- command: `python bench/onnx.py --reps {args.reps}`",
        "",
        "## all-MiniLM-L6-v2, batch of 8 sentences (~32 tokens each)",
        "",
        f"Median of {args.reps} runs after one warm-up, each variant in a fresh process; cosine "
        "against the PyTorch (sentence-transformers) vectors.",
        "",
        "| variant | size MB | 1 thread ms | 2 threads ms | cosine mean | cosine min | "
        "peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in embed_rows:
        lines.append(f"| {r['variant']} | {r['size_mb']:.1f} | {r['ms_1t']:.1f} | "
                     f"{r['ms_2t']:.1f} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} | "
                     f"{r['rss_mb']:.0f} |")
    lines += [
        "",
        "ORT fp16 runs on the CPU execution provider here (no GPU): it shows the fp16 graph's "
        "accuracy, not Jetson speed.",
        "",
        f"## SmolLM2-135M-Instruct, greedy decode of {DECODE_TOKENS} tokens, 2 threads",
        "",
        "The HF weights are the shipped Q4_1 GGUF dequantized to fp32 (tests/support/models.py),"
        " so every variant starts from the same numbers. Peak RSS is the child process's.",
        "",
        "| variant | size MB | decode tok/s | time to first token ms | peak RSS MB | text |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in llm_rows:
        text = r["text"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['variant']} | {r['size_mb']:.0f} | {r['decode_tok_s']:.1f} | "
                     f"{r['ttft_ms']:.0f} | {r['rss_mb']:.0f} | {text} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        what, variant, path, tok, threads, *rest = sys.argv[2:]
        if what == "embed":
            result = child_embed(variant, path, tok, int(threads), int(rest[0]))
        else:
            result = child_decode(variant, path, tok, int(threads))
        print(json.dumps(result))
    else:
        main()
