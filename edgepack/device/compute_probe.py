"""Measure the decode compute rate of llama.cpp's Q8_0 kernels on this machine.

A constant fraction of a nominal FLOPS peak does not carry across CPUs: llama.cpp's Q8_0 decode
reached 23 % of the profile's peak on one x86 VM and 13 % on its successor (bench/results/
plan_accuracy.md). :func:`measure_decode_gflops` therefore runs llama.cpp itself: it writes a
synthetic random-weight Llama GGUF with Q8_0 matrices (``gguf.GGUFWriter``, blocks made with
``gguf.quants.quantize``), loads it with llama-cpp-python and decodes single tokens at each
thread count asked for. Effective GFLOPS = 2 x matrix parameters x tokens/s (the attention over
a context of a few dozen tokens adds < 0.1 %).

Size: :data:`PROBE_SHAPE` gives 90 M matrix parameters (96 MB of Q8_0). At the ~10 GFLOPS per
thread measured here a thread reads ~5 GB/s, below what one core's copy test reaches, so one
thread is compute-bound; the weights are larger than the last-level cache of the CPUs edgepack
targets (2 MB on a Pi 5, 8-36 MB on desktop x86) and than the share of a big server L3 one VM
sees, so they stream from DRAM like a real model's. Smaller is misleading: on this project's
2-vCPU Xeon VM (260 MB L3 shared with other VMs) 23-34 M-parameter probes measured up to 22
GFLOPS on one thread and 43 on two, cache-resident, where 57-300 M-parameter probes measured
9-13 and 16-25 (runs minutes apart on a shared machine) and the 135 M-1 B models of the accuracy
table decode at 9-10 and 16-19 (bench/results/plan_accuracy.md). The file goes to
/dev/shm when it has room (no SD-card write on a Pi), else the temp dir, and is deleted.

Time: writing ~0.1 s here; each thread count decodes up to :data:`CHUNKS` chunks of
:data:`CHUNK_TOKENS` tokens and stops early once it has spent :data:`BUDGET_SECONDS`. The
figure is the MEDIAN chunk, and the slowest and fastest chunks travel with it as its spread
(:class:`DecodeRate`; the profile's ``cpu.measured_decode_gflops_range``). Until 2026-11-30
the figure was the fastest of 4 chunks of 8 tokens: on this project's 2-vCPU VM, whose speed
moves minute to minute, that caught the VM's fast moments (8.9 / 10.8 / 12.1 GFLOPS on one
thread an hour apart) and the plan-accuracy table overestimated decode by up to 37 %. 12
chunks of 3 tokens decode 36 tokens where 4 x 8 decoded 32: the same ~1.3 s on this VM when
idle (1 and 2 threads), a little more on a slow one.

Prompt (prefill): after the decode chunks, each thread count also evaluates up to
:data:`PROMPT_BATCHES` prompts of :data:`PROMPT_TOKENS` tokens as one batch (stopping early
once it has spent :data:`PROMPT_BUDGET_SECONDS`), the figure again the median with the
slowest and fastest batch (``cpu.measured_prompt_gflops``; 2 x parameters x prompt tok/s).
1.5-2 s more on this VM (one 128-token batch: ~0.5 s on 1 thread, ~0.3 s on 2 when idle).

Without llama_cpp or gguf (a device without the GGUF runtime), or when llama.cpp fails to load
the probe, the result is None with the reason: never an exception. Device-side: imports nothing
from the build side.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgepack.device.profile import CpuSpec

# (hidden, layers, heads, kv heads, ffn, vocab): Llama-style blocks with grouped-query attention.
PROBE_SHAPE = (1024, 8, 16, 4, 2816, 256)
CHUNK_TOKENS = 3
CHUNKS = 12
BUDGET_SECONDS = 1.5
WARMUP_TOKENS = 4
PROMPT_TOKENS = 128
PROMPT_BATCHES = 3
PROMPT_BUDGET_SECONDS = 1.5


def probe_params(shape: tuple[int, ...] = PROBE_SHAPE) -> int:
    """Parameters in the probe's matrices that every decoded token multiplies (all blocks and
    the output projection; the token embedding is a row lookup)."""
    hidden, layers, heads, kv, ffn, vocab = shape
    kv_dim = kv * hidden // heads
    return layers * (2 * hidden * hidden + 2 * kv_dim * hidden + 3 * ffn * hidden) + vocab * hidden


def write_probe_gguf(path: Path, shape: tuple[int, ...] = PROBE_SHAPE, seed: int = 0) -> int:
    """Write the synthetic Q8_0 Llama to ``path``; returns :func:`probe_params`.

    Each matrix repeats a 64-row tile of N(0, 0.02) weights quantized by ``gguf.quants``: the
    values do not change the speed, and tiling keeps writing 96 MB to a fraction of a second.
    The vocabulary is a byte-level SentencePiece-style table of ``vocab`` tokens.
    """
    import gguf
    import numpy as np
    from gguf.quants import quantize

    hidden, layers, heads, kv, ffn, vocab = shape
    head_dim = hidden // heads
    q8 = gguf.GGMLQuantizationType.Q8_0
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("edgepack-compute-probe")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("llama")
    w.add_token_list([b"<unk>", b"<s>", b"</s>"]
                     + [f"<0x{i:02X}>".encode() for i in range(vocab - 3)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([int(gguf.TokenType.UNKNOWN)] + [int(gguf.TokenType.CONTROL)] * 2
                      + [int(gguf.TokenType.BYTE)] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(seed)
    tiles = {n: quantize(rng.standard_normal((64, n), dtype=np.float32) * 0.02, q8)
             for n in {hidden, ffn}}

    def matrix(name: str, rows: int, cols: int) -> None:
        w.add_tensor(name, np.tile(tiles[cols], (-(-rows // 64), 1))[:rows], raw_dtype=q8)

    ones = np.ones(hidden, dtype=np.float32)
    matrix("token_embd.weight", vocab, hidden)
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones)
        matrix(p + "attn_q.weight", hidden, hidden)
        matrix(p + "attn_k.weight", kv * head_dim, hidden)
        matrix(p + "attn_v.weight", kv * head_dim, hidden)
        matrix(p + "attn_output.weight", hidden, hidden)
        w.add_tensor(p + "ffn_norm.weight", ones)
        matrix(p + "ffn_gate.weight", ffn, hidden)
        matrix(p + "ffn_up.weight", ffn, hidden)
        matrix(p + "ffn_down.weight", hidden, ffn)
    w.add_tensor("output_norm.weight", ones)
    matrix("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return probe_params(shape)


@contextlib.contextmanager
def _scratch_dir(need_bytes: int) -> Iterator[Path]:
    shm = Path("/dev/shm")
    base: str | None = None
    try:
        roomy = shm.is_dir() and shutil.disk_usage(shm).free > 2 * need_bytes
        base = str(shm) if roomy and os.access(shm, os.W_OK) else None
    except OSError:
        base = None
    with tempfile.TemporaryDirectory(prefix="edgepack-compute-", dir=base) as d:
        yield Path(d)


@dataclass(frozen=True)
class Rate:
    """A measured rate, GFLOPS: the median chunk (or prompt batch), and the slowest and fastest
    (None for a figure cached before the spread was kept)."""

    gflops: float
    low: float | None = None
    high: float | None = None

    @property
    def spread(self) -> tuple[float, float] | None:
        return None if self.low is None or self.high is None else (self.low, self.high)


@dataclass(frozen=True)
class DecodeRate(Rate):
    """One thread count's measurement: the decode rate (the :class:`Rate` fields) and the prompt
    (prefill) rate (None for a figure cached before the probe timed prompts)."""

    prompt: Rate | None = None


def contended(rates: Mapping[int, Rate]) -> str | None:
    """Why ``rates`` describe a machine whose cores other work shares, or None: llama.cpp on
    all cores decoding slower than on one. The load average misses it when the other work
    started within the minute: on this project's 2-vCPU build VM, at load 1.9, the 2-thread
    figure read 0.19 GFLOPS where 1 thread read 8.7."""
    if not rates:
        return None
    most = max(rates)
    one = rates.get(1)
    if most > 1 and one is not None and rates[most].gflops < one.gflops:
        return (f"{most} threads decoded at {rates[most].gflops:g} GFLOPS, below 1 thread's "
                f"{one.gflops:g}: other work shares the cores")
    return None


def _chunk_rates(llm: Any) -> list[float]:
    """Tokens/s of each of up to CHUNKS chunks of CHUNK_TOKENS single-token decode steps."""
    llm.eval([1] + list(range(3, 3 + WARMUP_TOKENS - 1)))  # first pass pages the weights in
    rates: list[float] = []
    start = time.perf_counter()
    token = 10
    for _ in range(CHUNKS):
        t0 = time.perf_counter()
        for _ in range(CHUNK_TOKENS):
            llm.eval([token])
            token += 1
        rates.append(CHUNK_TOKENS / (time.perf_counter() - t0))
        if time.perf_counter() - start >= BUDGET_SECONDS:
            break
    return rates


def _prompt_rates(llm: Any) -> list[float]:
    """Tokens/s of each of up to PROMPT_BATCHES prompts of PROMPT_TOKENS tokens, each evaluated
    as one batch from an empty cache."""
    rates: list[float] = []
    start = time.perf_counter()
    for i in range(PROMPT_BATCHES):
        llm.reset()
        tokens = [1] + [3 + (7 * j + i) % 250 for j in range(PROMPT_TOKENS - 1)]
        t0 = time.perf_counter()
        llm.eval(tokens)
        rates.append(PROMPT_TOKENS / (time.perf_counter() - t0))
        if time.perf_counter() - start >= PROMPT_BUDGET_SECONDS:
            break
    return rates


def decode_rate(chunk_tps: Sequence[float], params: int) -> DecodeRate:
    """The :class:`DecodeRate` of chunks decoded at ``chunk_tps`` tokens/s by a model
    multiplying ``params`` matrix parameters per token (2 FLOP each)."""
    r = rate_of(chunk_tps, params)
    return DecodeRate(r.gflops, r.low, r.high)


def rate_of(tps: Sequence[float], params: int) -> Rate:
    """The median, slowest and fastest of ``tps`` (tokens/s) as GFLOPS: 2 x ``params`` FLOP a
    token."""
    def gflops(x: float) -> float:
        return round(2 * params * x / 1e9, 2)

    return Rate(gflops(statistics.median(tps)), gflops(min(tps)), gflops(max(tps)))


METHOD = (
    f"llama.cpp Q8_0 decode of a synthetic {probe_params() / 1e6:.0f} M-parameter Llama "
    f"(edgepack.device.compute_probe: median of {CHUNKS} x {CHUNK_TOKENS} tokens, "
    "2 x parameters x tok/s)"
)
PROMPT_METHOD = (
    f"llama.cpp Q8_0 prompt evaluation of a synthetic {probe_params() / 1e6:.0f} M-parameter "
    f"Llama (edgepack.device.compute_probe: median of up to {PROMPT_BATCHES} batches of "
    f"{PROMPT_TOKENS} tokens, 2 x parameters x tok/s)"
)


def measure_decode_gflops(threads: Sequence[int]) -> tuple[dict[int, DecodeRate] | None, str]:
    """({thread count: effective decode GFLOPS, median chunk and spread, and the same for a
    prompt batch}, how) of llama.cpp's Q8_0 kernels, or (None, why not) when the GGUF runtime
    is missing or cannot run the probe."""
    try:
        import gguf  # noqa: F401
        import llama_cpp
    except ImportError as e:
        return None, f"not measured: the GGUF runtime is not importable here ({e})"
    counts = sorted({int(t) for t in threads if int(t) > 0})
    if not counts:
        return None, "not measured: no thread count given"
    params = probe_params()
    n_ctx = max(WARMUP_TOKENS + CHUNKS * CHUNK_TOKENS, PROMPT_TOKENS) + 8
    rates: dict[int, DecodeRate] = {}
    t_start = time.perf_counter()
    try:
        with _scratch_dir(params * 34 // 32) as d:
            path = d / "probe-q8_0.gguf"
            write_probe_gguf(path)
            for n in counts:
                llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=PROMPT_TOKENS,
                                      n_ubatch=PROMPT_TOKENS, n_threads=n, n_threads_batch=n,
                                      verbose=False)
                try:
                    decode = decode_rate(_chunk_rates(llm), params)
                    rates[n] = replace(decode, prompt=rate_of(_prompt_rates(llm), params))
                finally:
                    llm.close()
    except (OSError, ValueError, RuntimeError) as e:
        return None, f"not measured: llama.cpp could not run the compute probe ({e})"
    took = time.perf_counter() - t_start
    return rates, (f"measured now with llama-cpp-python {llama_cpp.__version__} "
                   f"({took:.1f} s)")


def with_measured_compute(cpu: CpuSpec, rates: Mapping[int, DecodeRate], how: str, stamp: str,
                          sources: dict[str, str]) -> CpuSpec:
    """``cpu`` with the measured decode and prompt rates (and their spreads, when known) at its
    core count and at 1 thread (a 1-core CPU gets the first only), each with its source in
    ``sources``; without rates, the source says why (``how``)."""
    at_cores = rates.get(cpu.cores)
    at_one = rates.get(1) if cpu.cores > 1 else None
    fields: dict[str, Any] = {}
    for suffix, n, rate in (("", cpu.cores, at_cores), ("_1t", 1, at_one)):
        for kind, method, r in (("decode", METHOD, rate),
                                ("prompt", PROMPT_METHOD, rate.prompt if rate else None)):
            name = f"measured_{kind}_gflops{suffix}"
            fields[name] = None if r is None else r.gflops
            fields[f"{name}_range"] = None if r is None else r.spread
            if r is None:
                continue
            sources[f"cpu.{name}"] = f"{method} at {n} thread(s); {how}; {stamp}"
            if r.spread is not None:
                sources[f"cpu.{name}_range"] = (
                    f"slowest and fastest {'chunk' if kind == 'decode' else 'batch'} of the "
                    f"measurement of cpu.{name}; {stamp}")
    if at_cores is None and at_one is None and how:
        sources["cpu.measured_decode_gflops"] = f"{how}; {stamp}"
    return replace(cpu, **fields)
