"""Memory and speed estimates for one (model, device, format, quant, context). Pure.

Memory (llama.cpp, CPU) = weights (per tensor, with llama.cpp's quant rules and fallbacks)
+ KV cache (2 x layers x ctx x kv_heads x head_dim x 2 bytes, f16 cache, ctx padded to 256)
+ compute buffer + output buffer + runtime overhead. Repacked weights (llama.cpp copies Q4_0 /
Q4_K / ... tensors into interleaved blocks at load on CPUs with AVX2 or Arm dotprod/i8mm) also
leave their file pages mapped; those pages are clean page cache the kernel can reclaim, so they
count in the expected peak RSS but not in what must fit.

Calibration (llama-cpp-python 0.3.36, n_ubatch 512). llama.cpp *reserves* a compute buffer
(its load log, ``sched_reserve``), but only the pages a graph writes become resident, and
filling a long context grows it past the reservation. What counts is the peak RSS (VmHWM) of a
fresh process after the context is filled to its end (bench/plan_accuracy.py's worker, which
loads a model as the server does). Chat and completion bundles are served with flash attention
unless it changed the validated answers (the build decides, ``Plan.flash_attn``), so both
kernels have a formula. With flash attention (2026-11-30, Intel Xeon VM, 2 threads, SmolLM2-135M
Q8_0)::

    ctx    measured peak RSS   = 68 MiB runtime + 136.4 weights + KV + compute (formula)
    512        227.3 MiB          68 + 136.4 +  11.25 +  12.46 = 228.1
    2048       263.9 MiB          68 + 136.4 +  45.00 +  13.96 = 263.4
    8192       405.4 MiB          68 + 136.4 + 180.00 +  19.96 = 404.4

    compute = 4 bytes x n_ubatch x 1.45 x (2 n_ff + 2 n_embd) + 2 bytes x n_ubatch x n_ctx

The first term is one micro-batch's activations (1.45: intermediate copies and allocator
placement, fitted above); the second is the f16 attention mask flash attention reads. Held out
(random-weight Llamas of bench/plan_accuracy.py, same runs): llama-0.5b ctx 512 / 2048 measured
706.9 / 771.0 MiB, formula +0.5 / -2.1 MiB; llama-1b ctx 512 1233.7 MiB, formula -2.8 MiB.

Without flash attention (earlier calibration on an AMD EPYC VM, same model)::

    512        238.0 MiB          68 + 136.4 +  11.25 +  22.75 = 238.4
    2048       315.7 MiB          68 + 136.4 +  45.00 +  66.25 = 315.7
    8192       622.3 MiB          68 + 136.4 + 180.00 + 240.25 = 624.7

    compute = 4 bytes x n_ubatch x (1.45 x (n_head + 1) x n_ctx + 2 n_ff + 2 n_embd)

llama.cpp then keeps the attention scores of a micro-batch against the whole context (the
(n_head + 1) x n_ctx term, scores plus mask; 1.45 fitted on 9 heads only). The 68 MiB runtime is
the interpreter + llama_cpp import (46 MiB) plus tokenizer tables and allocator slack (22 MiB).

Speed: decode time per token = max(bytes read / (eta x bandwidth), 2 x params / compute rate)
+ n_layer x tau, where tau is the per-layer fixed cost (thread sync, op dispatch) that makes
small models overhead-bound. Prompt tok/s = prompt compute rate / (2 x params), the rate
(:func:`prompt_compute_gflops`) measured like the decode one below
(``cpu.measured_prompt_gflops``: one 128-token batch of the same probe), else eta_pp x peak
FLOPS.

The compute rate (:func:`decode_compute_gflops`) is, in order of preference:

1. measured: ``cpu.measured_decode_gflops`` / ``..._1t`` of the profile, llama.cpp itself
   decoding a synthetic Q8_0 Llama on this machine (:mod:`edgepack.device.compute_probe`;
   ``profiles detect --measure`` and ``--device local`` fill it), at the thread count the plan
   uses (:func:`edgepack.device.profile.decode_gflops_at`): the probe's median chunk, its
   slowest..fastest chunks stated beside it in the basis. Only Q8_0-class dot-product kernels
   are measured: a mostly repacked model (Q4_0/Q4_K on AVX2, Q4-Q8 on Arm dotprod) gets the
   measured rate x ETA_COMPUTE_REPACK / ETA_COMPUTE_DOT, and on Arm with dotprod, where the Q8_0
   probe itself runs repacked kernels, a non-repacked model gets the inverse. The probe's own
   per-layer cost (8 layers) is inside its rate, < 2 % of its step time.
2. nominal: ETA_COMPUTE_* x ``cpu.peak_gflops_fp32`` (shipped profiles; a detect without
   --measure). These fractions were fitted on one x86 VM (see the constants) and do not carry
   across hosts: on this VM's successor Q8_0 decode reached 13 % of the peak, not 23 %, and
   nominal estimates were 33-76 % high (bench/results/plan_accuracy.md).

Speed constants: ETA_COMPUTE_* were fitted on the build machine in the runs where llama.cpp got
most of its CPU (see the constants); ETA_DECODE, TAU_CPU, the prompt and GPU figures are
engineering defaults, not validated: the only machine here is a 2-vCPU VM shared with other jobs
(bench/results/plan_accuracy.md). Re-fit them with bench/plan_accuracy.py on an idle machine or
a real device; the memory model above does not depend on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgepack.device.profile import (
    DeviceProfile,
    decode_gflops_at,
    decode_range_at,
    effective_bandwidth_gbps,
)
from edgepack.plan.facts import ModelFacts
from edgepack.plan.gguf_header import GgufTensorInfo
from edgepack.plan.quants import (
    FILE_TYPES_BY_NAME,
    GGML_TYPES,
    ONNX_QUANTS_BY_NAME,
    GgufTensor,
    gguf_tensor_plan,
    onnx_tensor_nbytes,
    tensor_nbytes,
)

MIB = 1024 * 1024
GGUF_BATCH = 512
GGUF_UBATCH = 512

# Process baseline of a llama-cpp-python server: interpreter + llama_cpp import measured at
# 46 MiB RSS on the build machine, plus tokenizer tables and allocator slack (22 MiB for
# SmolLM2, fitted in the module docstring's table).
LLAMA_RUNTIME_OVERHEAD = 68 * MIB
# Resident scratch relative to its tensors' sizes (allocator placement, intermediate copies),
# fitted in the module docstring's tables: without flash attention on the attention scores
# (micro-batch token x context cell x (heads + 1)), with it on one micro-batch's activations.
ATTN_SCRATCH_FACTOR = 1.45
ACTIVATION_FACTOR = 1.45
# A CUDA context on Jetson (Orin, JetPack 6) takes a few hundred MiB of the shared memory.
# Not measurable here (no Jetson); edgepack's assumption, stated in the plan's rationale.
CUDA_RUNTIME_OVERHEAD = 512 * MIB
# onnxruntime + tokenizers import and session arena baseline (assumption pending measurement).
ONNX_RUNTIME_OVERHEAD = 96 * MIB

# Speed constants (see module docstring). eta: fraction of the profile's effective bandwidth
# a decode step streams weights at; tau: fixed seconds per layer per token.
ETA_DECODE = 0.80
TAU_CPU = 40e-6
# Fraction of peak FP32 FLOPS a decode step reaches when compute-bound. Measured on the build
# machine (1 llama.cpp thread, SmolLM2-135M, runs where the process got 74-100% of its CPU):
# repacked Q4_0 (q4_0_8x8 kernels) 104.8 tok/s -> 0.39; Q4_K_M (mostly Q5_0/Q8_0 fallbacks, not
# repacked) 61-65 tok/s and Q8_0 63-67 tok/s -> 0.23.
ETA_COMPUTE_REPACK = 0.39
ETA_COMPUTE_DOT = 0.23  # CPUs with int8 dot products (AVX2/VNNI, Arm dotprod/i8mm)
ETA_COMPUTE_NO_DOT = 0.12  # Arm without dotprod (Pi 4, Cortex-A72): widening multiplies
ETA_PROMPT = 0.35
ETA_PROMPT_REPACK = 0.50  # repacked Q4_0/Q4_K kernels (GEMM on interleaved blocks)
ETA_GPU_DECODE = 0.60  # assumption for Jetson (not measurable here)
TAU_GPU = 25e-6
GPU_FALLBACK_TFLOPS_PER_CORE = 2.0e-3  # 2 FLOP x ~1 GHz per CUDA core, when the profile has none


@dataclass(frozen=True)
class Estimate:
    """What one option costs on one device. Bytes are exact integers; speeds are tok/s."""

    format: str
    quant: str
    ctx: int
    batch: int
    ubatch: int
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    output_bytes: int
    overhead_bytes: int
    repack_duplicate_bytes: int
    decode_tps: float | None
    prompt_tps: float
    bytes_per_token: int
    quality_metric: str
    quality_value: float
    tensor_types: dict[str, int] = field(default_factory=dict)
    fallback_tensors: int = 0
    slots: int = 1  # sequences with KV cache of their own (plan/slots.py); kv_bytes counts all

    @property
    def required_bytes(self) -> int:
        """What must fit in usable memory."""
        return (
            self.weights_bytes
            + self.kv_bytes
            + self.compute_bytes
            + self.output_bytes
            + self.overhead_bytes
        )

    @property
    def expected_peak_rss_bytes(self) -> int:
        """Peak RSS of the serving process with the context full."""
        return self.required_bytes + self.repack_duplicate_bytes

    def memory_dict(self) -> dict[str, Any]:
        return {
            "weights_bytes": self.weights_bytes,
            "kv_cache_bytes": self.kv_bytes,
            "kv_cache_slots": self.slots,
            "compute_buffer_bytes": self.compute_bytes,
            "output_buffer_bytes": self.output_bytes,
            "runtime_overhead_bytes": self.overhead_bytes,
            "required_bytes": self.required_bytes,
            "repack_page_cache_bytes": self.repack_duplicate_bytes,
            "expected_peak_rss_bytes": self.expected_peak_rss_bytes,
            "tensor_types": dict(sorted(self.tensor_types.items())),
            "fallback_tensors": self.fallback_tensors,
        }

    def speed_dict(self) -> dict[str, Any]:
        return {
            "decode_tokens_per_second": None
            if self.decode_tps is None
            else round(self.decode_tps, 2),
            "prompt_tokens_per_second": round(self.prompt_tps, 1),
            "bytes_read_per_token": self.bytes_per_token,
        }


def _has_dot(profile: DeviceProfile) -> bool:
    isa = set(profile.cpu.isa)
    return bool(isa & {"avx2", "dotprod", "i8mm", "avx512_vnni", "avx_vnni"})


def _eta_compute(profile: DeviceProfile, repacked: bool) -> float:
    if repacked:
        return ETA_COMPUTE_REPACK
    return ETA_COMPUTE_DOT if _has_dot(profile) else ETA_COMPUTE_NO_DOT


def decode_compute_gflops(profile: DeviceProfile, *, repacked: bool = False) -> tuple[float, str]:
    """(GFLOPS a compute-bound llama.cpp decode step reaches on ``profile``'s CPU with
    ``profile.cpu.cores`` threads, the basis in words), for a model whose quantized matrices
    are mostly ``repacked`` or not. See the module docstring: the measured rate when the
    profile has one (Q8_0-class kernels; repacked models scaled by the ETA ratio), else a
    fitted fraction of the nominal peak."""
    probe = _eta_compute(profile, "Q8_0" in repack_types(profile))
    return _compute_rate(profile, "decode", _eta_compute(profile, repacked), probe, repacked)


def _eta_prompt(repacked: bool) -> float:
    return ETA_PROMPT_REPACK if repacked else ETA_PROMPT


def prompt_compute_gflops(profile: DeviceProfile, *, repacked: bool = False) -> tuple[float, str]:
    """(GFLOPS llama.cpp's prompt evaluation reaches on ``profile``'s CPU with
    ``profile.cpu.cores`` threads, the basis in words), as :func:`decode_compute_gflops` does
    for decode: the measured prompt rate (``cpu.measured_prompt_gflops``, a 128-token batch of
    the Q8_0 probe) when the profile has one, else ETA_PROMPT* x the nominal peak."""
    probe = _eta_prompt("Q8_0" in repack_types(profile))
    return _compute_rate(profile, "prompt", _eta_prompt(repacked), probe, repacked)


def _compute_rate(profile: DeviceProfile, kind: str, eta: float, probe_eta: float,
                  repacked: bool) -> tuple[float, str]:
    cpu = profile.cpu
    measured = decode_gflops_at(cpu, cpu.cores, kind)
    if measured is None:
        return eta * cpu.peak_gflops_fp32, (
            f"nominal: {eta:g} x {cpu.peak_gflops_fp32:g} GFLOPS fp32 peak (a fraction fitted "
            "on another CPU; measure with profiles detect --measure or --device local)")
    basis = (f"measured: llama.cpp Q8_0 {kind} {measured:g} GFLOPS at {cpu.cores} "
             f"thread{'s' if cpu.cores > 1 else ''}")
    spread = decode_range_at(cpu, cpu.cores, kind)
    if spread is not None:
        basis += (f", {'chunks' if kind == 'decode' else 'batches'} "
                  f"{spread[0]:g}-{spread[1]:g}")
    if eta != probe_eta:
        basis += (f", x {eta:g}/{probe_eta:g} for {'repacked' if repacked else 'non-repacked'}"
                  " kernels")
    return measured * eta / probe_eta, basis


def speed_basis(profile: DeviceProfile, est: Estimate) -> dict[str, Any]:
    """Where a GGUF CPU decode estimate's figures came from, for plan output: the compute
    rate used for ``est`` and its basis, the memory bandwidth and its basis."""
    repacked = mostly_repacked(est.tensor_types, repack_types(profile))
    gflops, basis = decode_compute_gflops(profile, repacked=repacked)
    spread = decode_range_at(profile.cpu, profile.cpu.cores)
    prompt, prompt_basis = prompt_compute_gflops(profile, repacked=repacked)
    prompt_spread = decode_range_at(profile.cpu, profile.cpu.cores, "prompt")
    measured_bw = profile.memory.measured_bandwidth_gbps is not None
    return {
        "decode_gflops": round(gflops, 2),
        "compute_basis": basis,
        # the probe's slowest and fastest chunk at the plan's threads (null: not measured, or
        # measured before edgepack kept the spread)
        "measured_decode_gflops_range": None if spread is None else list(spread),
        "prompt_gflops": round(prompt, 2),
        "prompt_basis": prompt_basis,
        "measured_prompt_gflops_range": None if prompt_spread is None else list(prompt_spread),
        "effective_bandwidth_gbps": effective_bandwidth_gbps(profile),
        "bandwidth_basis": "measured" if measured_bw else "theoretical x derating",
    }


def mostly_repacked(counts: dict[str, int], repack: frozenset[str]) -> bool:
    """True when at least half of the quantized tensors are of a type llama.cpp repacks."""
    quantized = sum(v for k, v in counts.items() if k not in ("F32", "F16", "BF16"))
    repacked = sum(v for k, v in counts.items() if k in repack)
    return bool(quantized) and repacked * 2 >= quantized


def repack_types(profile: DeviceProfile) -> frozenset[str]:
    """ggml types llama.cpp's CPU backend repacks at load on this CPU.

    From ``ggml_repack_get_optimal_repack_type`` in ggml/src/ggml-cpu/repack.cpp (llama.cpp of
    llama-cpp-python 0.3.36): AVX2 -> Q4_0, Q4_K (and Q2_K with AVX-512); Arm NEON with dotprod
    or i8mm -> Q4_0, Q4_K, Q5_K, Q6_K, Q8_0; plain NEON (Pi 4) -> none.
    """
    isa = set(profile.cpu.isa)
    if profile.cpu.arch == "x86_64" and "avx2" in isa:
        return frozenset({"Q4_0", "Q4_K"} | ({"Q2_K"} if "avx512f" in isa else set()))
    if profile.cpu.arch == "aarch64" and isa & {"dotprod", "i8mm"}:
        return frozenset({"Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0"})
    return frozenset()


def repacks_q4_0(profile: DeviceProfile) -> bool:
    return "Q4_0" in repack_types(profile)


def gpu_offload(facts: ModelFacts, profile: DeviceProfile, est: Estimate | None = None) -> int:
    """Layers llama.cpp should put on the GPU (``n_layer + 1`` = all layers and the output).

    With shared memory (Jetson) offloading moves no bytes between pools, so all layers go.
    With dedicated VRAM, as many layers as fit next to the compute buffer and CUDA context.
    """
    if profile.accelerator.kind != "cuda" or facts.family != "decoder":
        return 0
    vram = profile.accelerator.memory_gib
    if profile.accelerator.memory != "dedicated" or vram is None or est is None:
        return facts.n_layer + 1
    free = int(vram * 1024**3) - CUDA_RUNTIME_OVERHEAD - est.compute_bytes - est.output_bytes
    per_layer = (est.weights_bytes + est.kv_bytes) / (facts.n_layer + 1)
    return max(0, min(facts.n_layer + 1, int(free // per_layer)))


def gguf_tensors(facts: ModelFacts) -> list[GgufTensor]:
    """The model's tensors as an F16 GGUF holds them (1-D tensors F32, as convert_hf_to_gguf)."""
    return [
        GgufTensor(t.gguf_name, t.gguf_shape, "F32" if len(t.shape) < 2 else "F16")
        for t in facts.tensors
        if t.gguf_name is not None
    ]


def _exotic_nbytes(type_name: str, shape: tuple[int, ...]) -> int:
    # Types the quantizer never produces here (IQ*, TQ*) but a downloaded GGUF may hold.
    return GgufTensorInfo("", tuple(shape), type_name).nbytes


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


def estimate_gguf(
    facts: ModelFacts,
    profile: DeviceProfile,
    quant: str,
    ctx: int,
    *,
    stored_kld: float | None = None,
    flash_attn: bool = True,
) -> Estimate:
    """Memory and speed of llama.cpp serving ``facts`` as GGUF ``quant`` at context ``ctx``,
    with or without flash attention (decoders only; see the module docstring).

    With ``stored_kld`` the facts come from an existing GGUF file (a GGUF repo): every tensor
    keeps the type it is stored in (``TensorFact.dtype``), ``quant`` is only the file's label
    and ``stored_kld`` its quality figure.
    """
    if stored_kld is not None:
        tensors = [GgufTensor(t.gguf_name, t.gguf_shape, t.dtype)
                   for t in facts.tensors if t.gguf_name is not None]
        types, fallbacks = {t.name: t.source_type for t in tensors}, 0
        kld = stored_kld
    else:
        ft = FILE_TYPES_BY_NAME[quant]
        kld = ft.kld
        tensors = gguf_tensors(facts)
        types, fallbacks = gguf_tensor_plan(
            ft, tensors, n_layer=facts.n_layer, n_gqa=facts.n_gqa
        )
    weights = 0
    repack_dup = 0
    read_per_token = 0
    counts: dict[str, int] = {}
    repack = repack_types(profile) if profile.accelerator.kind == "none" else frozenset()
    for t in tensors:
        ty = types[t.name]
        n = tensor_nbytes(ty, t.shape) if ty in GGML_TYPES else _exotic_nbytes(ty, t.shape)
        weights += n
        counts[ty] = counts.get(ty, 0) + 1
        if (
            ty in repack
            and len(t.shape) == 2
            and t.shape[1] % 8 == 0
            and t.name != "token_embd.weight"
        ):
            repack_dup += n
        # a decode step reads every matrix once, except the token embedding table (one row)
        # unless it doubles as the output projection
        if t.name != "token_embd.weight" or facts.tied_embeddings:
            read_per_token += n
    if facts.family == "decoder":
        ctx_cells = _pad(ctx, 256)
        kv = 2 * facts.n_layer * ctx_cells * facts.n_kv_head * facts.head_dim * 2
        ub = min(GGUF_UBATCH, ctx)
        if flash_attn:  # no scores matrix; an f16 mask of ub x ctx cells
            activations = ACTIVATION_FACTOR * (2 * facts.ffn_size + 2 * facts.hidden_size)
            compute = int(4 * ub * activations + 2 * ub * ctx_cells)
        else:
            attn = ATTN_SCRATCH_FACTOR * (facts.n_head + 1) * ctx_cells
            compute = int(4 * ub * (attn + 2 * facts.ffn_size + 2 * facts.hidden_size))
        output = 4 * facts.vocab_size
    else:
        # llama.cpp embeddings: no KV cache; the graph holds activations for one batch.
        kv, ub, output = 0, min(GGUF_UBATCH, ctx), 4 * facts.hidden_size * ctx
        compute = 4 * ub * ((facts.n_head + 1) * ctx + 2 * facts.ffn_size)
    gpu = profile.accelerator.kind == "cuda"
    overhead = LLAMA_RUNTIME_OVERHEAD + (CUDA_RUNTIME_OVERHEAD if gpu else 0)
    decode, prompt = _speeds(facts, profile, read_per_token, gpu, repack, counts)
    return Estimate(
        format="gguf",
        quant=quant,
        ctx=ctx,
        batch=GGUF_BATCH,
        ubatch=ub,
        weights_bytes=weights,
        kv_bytes=kv,
        compute_bytes=compute,
        output_bytes=output,
        overhead_bytes=overhead,
        repack_duplicate_bytes=repack_dup,
        decode_tps=decode if facts.family == "decoder" else None,
        prompt_tps=prompt,
        bytes_per_token=read_per_token,
        quality_metric="kld_llama3_8b",
        quality_value=kld,
        tensor_types=counts,
        fallback_tensors=fallbacks,
    )


def _speeds(
    facts: ModelFacts,
    profile: DeviceProfile,
    read: int,
    gpu: bool,
    repack: frozenset[str],
    counts: dict[str, int],
) -> tuple[float, float]:
    params = facts.n_params - (0 if facts.tied_embeddings else facts.vocab_size * facts.hidden_size)
    flops_per_token = 2.0 * max(params, 1)
    bw = effective_bandwidth_gbps(profile) * 1e9
    if gpu:
        acc = profile.accelerator
        tflops = (
            getattr(acc, "fp16_tflops", None)
            or (acc.cuda_cores or 1024) * GPU_FALLBACK_TFLOPS_PER_CORE
        )
        t_decode = read / (ETA_GPU_DECODE * bw) + facts.n_layer * TAU_GPU
        prompt = 0.3 * tflops * 1e12 / flops_per_token
        return 1.0 / t_decode, prompt
    repacked = mostly_repacked(counts, repack)
    t_mem = read / (ETA_DECODE * bw)
    t_comp = flops_per_token / (decode_compute_gflops(profile, repacked=repacked)[0] * 1e9)
    t_decode = max(t_mem, t_comp) + facts.n_layer * TAU_CPU
    prompt = prompt_compute_gflops(profile, repacked=repacked)[0] * 1e9
    return 1.0 / t_decode, prompt / flops_per_token


def estimate_onnx(facts: ModelFacts, profile: DeviceProfile, quant: str, ctx: int) -> Estimate:
    """Memory and speed of ONNX Runtime serving ``facts`` with weights stored as ``quant``."""
    q = ONNX_QUANTS_BY_NAME[quant]
    weights = 0
    for t in facts.tensors:
        # every tensor is exported (pooler and classifier heads included)
        is_embd = t.gguf_name in ("token_embd.weight", "position_embd.weight", "token_types.weight")
        weights += onnx_tensor_nbytes(q, t.shape, is_embedding=is_embd)
    act_bytes = 2 if quant == "fp16" else 4
    if facts.family == "decoder":
        kv = 2 * facts.n_layer * ctx * facts.n_kv_head * facts.head_dim * act_bytes
        # one prompt of ctx tokens through the largest layer + logits for the last token
        compute = act_bytes * (
            ctx * (4 * facts.hidden_size + 2 * facts.ffn_size)
            + facts.n_head * min(ctx, 2048) * min(ctx, 2048)
            + facts.vocab_size * ctx
        )
    else:
        kv = 0
        compute = (
            act_bytes * ctx * (4 * facts.hidden_size + 2 * facts.ffn_size + 2 * facts.n_head * ctx)
        )
    bw = effective_bandwidth_gbps(profile) * 1e9
    peak = profile.cpu.peak_gflops_fp32 * 1e9
    flops = 2.0 * facts.n_params
    decode = None
    if facts.family == "decoder":
        decode = 1.0 / (weights / (ETA_DECODE * bw) + facts.n_layer * 2 * TAU_CPU)
    return Estimate(
        format="onnx",
        quant=quant,
        ctx=ctx,
        batch=1,
        ubatch=1,
        weights_bytes=weights,
        kv_bytes=kv,
        compute_bytes=compute,
        output_bytes=0,
        overhead_bytes=ONNX_RUNTIME_OVERHEAD,
        repack_duplicate_bytes=0,
        decode_tps=decode,
        prompt_tps=ETA_PROMPT * peak / flops,
        bytes_per_token=weights,
        quality_metric="rank",
        quality_value=float(q.rank),
        tensor_types={quant: len(facts.tensors)},
    )
