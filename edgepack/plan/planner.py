"""The planner: a pure function of (model facts, device profile, options) -> Plan.

No I/O. The memory and speed models and their calibration live in :mod:`edgepack.plan.estimate`;
this module makes the choice and explains it: every option it did not take is listed with the
reason (does not fit by X MiB, slower than --min-tokens-per-second, lower quality than chosen).

Choice: walk the quantizations from best to worst quality (llama.cpp's published KL divergence
for GGUF, see :mod:`edgepack.plan.quants`) and take the first that fits the usable memory with
headroom and meets the speed floor. If none does at the requested context, halve the context
(down to 512 tokens) and say so. If none does at all, raise BuildError (exit 5) naming the
smallest option, by how much it misses, and what would fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edgepack.device.profile import (
    DeviceProfile,
    effective_bandwidth_gbps,
    profile_digest,
)
from edgepack.errors import BuildError, UsageError
from edgepack.plan.estimate import (
    CUDA_RUNTIME_OVERHEAD,
    MIB,
    Estimate,
    estimate_gguf,
    estimate_onnx,
    gpu_offload,
    repacks_q4_0,
)
from edgepack.plan.facts import ModelFacts
from edgepack.plan.quants import FILE_TYPES, ONNX_QUANTS, file_type

PLAN_SCHEMA = 1
DEFAULT_CTX = 4096
MIN_CTX = 512
# Kept free on top of the estimate: 10% of usable memory, at least 256 MiB, for what the
# estimate cannot see (page cache for the model file's first read, allocator fragmentation).
HEADROOM_FRACTION = 0.10
HEADROOM_MIN = 256 * MIB
# Below this decode speed the rationale warns (people read ~4-5 words/s, ~1.3 tokens a word).
SLOW_DECODE_TPS = 5.0


@dataclass(frozen=True)
class PlanOptions:
    """What the user asked for. ``None`` means "choose for me"."""

    format: str = "auto"  # auto | gguf | onnx
    ctx: int | None = None
    quant: str | None = None
    min_tokens_per_second: float | None = None


@dataclass(frozen=True)
class Rejected:
    format: str
    quant: str
    ctx: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "quant": self.quant, "ctx": self.ctx, "reason": self.reason}


@dataclass(frozen=True)
class Plan:
    """A build decision. ``to_dict()`` is the stable ``--json`` schema ``build`` consumes."""

    model: dict[str, Any]
    device: dict[str, Any]
    format: str
    quant: str
    ctx: int
    threads: int
    batch: int
    ubatch: int
    gpu_layers: int
    engine: str
    estimate: Estimate
    usable_bytes: int
    headroom_bytes: int
    rationale: tuple[str, ...]
    rejected: tuple[Rejected, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        e = self.estimate
        return {
            "schema": PLAN_SCHEMA,
            "model": self.model,
            "device": self.device,
            "format": self.format,
            "quant": self.quant,
            "engine": self.engine,
            "ctx": self.ctx,
            "threads": self.threads,
            "batch": self.batch,
            "ubatch": self.ubatch,
            "gpu_layers": self.gpu_layers,
            "memory": {
                **e.memory_dict(),
                "usable_bytes": self.usable_bytes,
                "headroom_bytes": self.headroom_bytes,
                "free_after_headroom_bytes": self.usable_bytes
                - self.headroom_bytes
                - e.required_bytes,
            },
            "speed": e.speed_dict(),
            "quality": {"metric": e.quality_metric, "value": e.quality_value},
            "rationale": list(self.rationale),
            "rejected": [r.to_dict() for r in self.rejected],
        }


def _fmt_mib(n: int) -> str:
    return f"{n / MIB:,.0f} MiB"


def _format_for(facts: ModelFacts, profile: DeviceProfile, options: PlanOptions) -> tuple[str, str]:
    if options.format not in ("auto", "gguf", "onnx"):
        raise UsageError(f"unknown format {options.format!r}", hint="use auto, gguf or onnx")
    if options.format != "auto":
        if facts.family == "encoder" and options.format == "gguf":
            return "gguf", "--format gguf as asked (llama.cpp serves BERT-style embedding models)"
        return options.format, f"--format {options.format} as asked"
    if facts.family == "encoder":
        return "onnx", f"{facts.architecture} is an encoder: ONNX Runtime serves it best"
    if profile.formats and profile.formats[0] == "onnx":
        return "onnx", f"{profile.id} prefers ONNX"
    return "gguf", f"{facts.architecture} is a decoder LLM: GGUF with llama.cpp"


def _candidates(fmt: str, facts: ModelFacts, profile: DeviceProfile, forced: str | None):
    if fmt == "gguf":
        names = [ft.name for ft in FILE_TYPES]
        if forced is not None:
            return [file_type(forced).name]
        return names
    names = [q.name for q in ONNX_QUANTS]
    if forced is not None:
        q = forced.lower()
        if q not in names:
            raise UsageError(
                f"unknown ONNX quantization {forced!r}", hint=f"use {', '.join(names)}"
            )
        return [q]
    return names


def _ctx_ladder(facts: ModelFacts, fmt: str, options: PlanOptions) -> list[int]:
    if facts.family == "encoder":
        return [facts.max_context if options.ctx is None else options.ctx]
    if options.ctx is not None:
        if options.ctx < 16:
            raise UsageError(f"--ctx {options.ctx} is too small", hint="use at least 256 tokens")
        if options.ctx > facts.max_context:
            raise UsageError(
                f"--ctx {options.ctx} exceeds the model's maximum context {facts.max_context}",
                hint=f"use --ctx {facts.max_context} or less",
            )
        start = options.ctx
    else:
        start = min(facts.max_context, DEFAULT_CTX)
    ladder = [start]
    while ladder[-1] // 2 >= MIN_CTX:
        ladder.append(ladder[-1] // 2)
    return ladder


def _estimate(
    fmt: str, quant: str, facts: ModelFacts, profile: DeviceProfile, ctx: int
) -> Estimate:
    if fmt == "gguf":
        return estimate_gguf(facts, profile, quant, ctx)
    return estimate_onnx(facts, profile, quant, ctx)


def _skip_reason(fmt: str, quant: str, profile: DeviceProfile, forced: bool) -> str | None:
    """Options never worth choosing unless asked for by name."""
    if forced:
        return None
    if fmt == "gguf" and quant == "F16":
        return (
            "Q8_0 is within 0.001 KLD of F16 (llama.cpp scoreboard) at half the memory "
            "and memory traffic; ask with --quant F16"
        )
    if fmt == "onnx" and quant == "fp16" and profile.accelerator.kind == "none":
        return "ONNX Runtime's CPU provider lacks fp16 kernels for most ops (casts to fp32)"
    if fmt == "onnx" and quant == "fp32":
        if profile.accelerator.kind == "cuda":
            return (
                "fp16 on the GPU halves memory and traffic (MiniLM cosine 1.000 against "
                "PyTorch, bench/onnx); ask with --quant fp32"
            )
        return (
            "int8 per-channel is 4x smaller and ~2x faster on a CPU (MiniLM cosine 0.994 "
            "against PyTorch, bench/onnx); ask with --quant fp32"
        )
    return None


def plan_build(
    facts: ModelFacts,
    profile: DeviceProfile,
    options: PlanOptions = PlanOptions(),
    *,
    alternatives: Sequence[DeviceProfile] = (),
) -> Plan:
    """Choose format, quant, context, threads and offload for ``facts`` on ``profile``.

    ``alternatives`` are other device profiles, used only to say what would fit when nothing
    does. Raises UsageError for impossible options and BuildError (exit 5) when no option fits
    the device or meets ``min_tokens_per_second``.
    """
    fmt, fmt_reason = _format_for(facts, profile, options)
    names = _candidates(fmt, facts, profile, options.quant)
    forced = options.quant is not None
    ladder = _ctx_ladder(facts, fmt, options)
    if forced and options.ctx is not None:
        ladder = ladder[:1]  # both pinned: no silent shrinking
    usable = int(profile.memory.usable_gib * 1024**3)
    headroom = max(HEADROOM_MIN, int(usable * HEADROOM_FRACTION))
    budget = usable - headroom
    floor = options.min_tokens_per_second

    rejected: list[Rejected] = []
    smallest: tuple[int, str, int, Estimate] | None = None
    chosen: tuple[str, int, Estimate] | None = None
    fastest: tuple[float, str] | None = None  # among options that fit, for the error message
    for ctx in ladder:
        tried: list[Rejected] = []
        for q in names:
            skip = _skip_reason(fmt, q, profile, forced)
            if skip:
                tried.append(Rejected(fmt, q, ctx, skip))
                continue
            est = _estimate(fmt, q, facts, profile, ctx)
            over = est.required_bytes - budget
            if smallest is None or est.required_bytes < smallest[0]:
                smallest = (est.required_bytes, q, ctx, est)
            if over > 0:
                tried.append(
                    Rejected(
                        fmt,
                        q,
                        ctx,
                        f"does not fit: needs {_fmt_mib(est.required_bytes)}, "
                        f"{_fmt_mib(over)} over the {_fmt_mib(budget)} left after "
                        f"{_fmt_mib(headroom)} headroom",
                    )
                )
                continue
            speed = est.decode_tps if est.decode_tps is not None else est.prompt_tps
            if fastest is None or speed > fastest[0]:
                fastest = (speed, q)
            if floor is not None and speed < floor:
                tried.append(
                    Rejected(
                        fmt,
                        q,
                        ctx,
                        f"too slow: about {speed:.1f} tok/s, below "
                        f"--min-tokens-per-second {floor:g}",
                    )
                )
                continue
            chosen = (q, ctx, est)
            break
        rejected.extend(tried)
        if chosen is not None:
            break
    if chosen is None:
        raise _nothing_fits(facts, profile, fmt, options, smallest, budget, fastest, alternatives)

    q, ctx, est = chosen
    chosen_rank = names.index(q)
    for lower in names[chosen_rank + 1 :]:
        rejected.append(Rejected(fmt, lower, ctx, f"lower quality than {q}"))
    rationale = [fmt_reason]
    rationale += _quant_rationale(fmt, q, est, forced, floor)
    requested = ladder[0]
    if ctx != requested:
        rationale.append(
            f"context shrunk from {requested} to {ctx} tokens: nothing fit at "
            f"{requested} (see rejected options)"
        )
    elif options.ctx is None and facts.family == "decoder":
        rationale.append(
            f"context {ctx}: min(model maximum {facts.max_context}, default {DEFAULT_CTX})"
        )
    rationale.append(f"{profile.cpu.cores} threads: one per physical core")
    layers = gpu_offload(facts, profile, est) if fmt == "gguf" else 0
    if layers:
        which = "all" if layers == facts.n_layer + 1 else f"{layers} of {facts.n_layer + 1}"
        rationale.append(
            f"{which} layers (incl. output) on the CUDA GPU ({profile.accelerator.memory} "
            "memory); needs a CUDA build of llama.cpp on the device; the CUDA context's "
            f"{CUDA_RUNTIME_OVERHEAD // MIB} MiB is an assumption, not measured on a Jetson"
        )
    if fmt == "gguf" and not layers and est.repack_duplicate_bytes:
        rationale.append(
            f"llama.cpp repacks this CPU's {q} matrices into interleaved blocks at load (faster "
            f"kernels); the file's pages ({_fmt_mib(est.repack_duplicate_bytes)}) stay as "
            "reclaimable page cache"
        )
    elif fmt == "gguf" and q == "Q4_0" and not repacks_q4_0(profile):
        rationale.append("no dotprod/i8mm/AVX2 here: llama.cpp does not repack Q4_0 on this CPU")
    if est.decode_tps is not None and est.decode_tps < SLOW_DECODE_TPS and floor is None:
        rationale.append(
            f"expect about {est.decode_tps:.1f} tok/s, slower than reading speed; "
            "--min-tokens-per-second trades quality for speed"
        )
    rationale.append(
        f"memory: {_fmt_mib(est.required_bytes)} of {_fmt_mib(usable)} usable "
        f"({_fmt_mib(headroom)} kept as headroom)"
    )
    return Plan(
        model=facts.to_dict(),
        device={
            "id": profile.id,
            "name": profile.name,
            "digest": profile_digest(profile),
            "effective_bandwidth_gbps": effective_bandwidth_gbps(profile),
        },
        format=fmt,
        quant=q,
        ctx=ctx,
        threads=profile.cpu.cores,
        batch=est.batch,
        ubatch=est.ubatch,
        gpu_layers=layers,
        engine="llama.cpp" if fmt == "gguf" else "onnxruntime",
        estimate=est,
        usable_bytes=usable,
        headroom_bytes=headroom,
        rationale=tuple(rationale),
        rejected=tuple(rejected),
    )


def _quant_rationale(
    fmt: str, q: str, est: Estimate, forced: bool, floor: float | None
) -> list[str]:
    if forced:
        return [f"{q} as asked with --quant"]
    why = f"{q}: the highest-quality option that fits with headroom"
    if floor is not None:
        why += f" and reaches --min-tokens-per-second {floor:g}"
    if fmt == "gguf":
        why += f" (KLD {est.quality_value:g} vs FP16 on LLaMA 3 8B, llama.cpp scoreboard)"
    return [why]


def _nothing_fits(
    facts: ModelFacts,
    profile: DeviceProfile,
    fmt: str,
    options: PlanOptions,
    smallest: tuple[int, str, int, Estimate] | None,
    budget: int,
    fastest: tuple[float, str] | None,
    alternatives: Sequence[DeviceProfile],
) -> BuildError:
    if smallest is None:
        return BuildError(
            f"no {fmt} option was left to try for {profile.id}",
            hint="drop --quant or pick another --format",
        )
    need, q, ctx, est = smallest
    over = need - budget
    if over <= 0:
        floor = options.min_tokens_per_second
        fast = (
            f" (fastest that fits: {fastest[1]}, about {fastest[0]:.1f} tok/s)" if fastest else ""
        )
        return BuildError(
            f"no {fmt} build of {facts.architecture} reaches {floor:g} tok/s on {profile.id}"
            + fast,
            hint="lower --min-tokens-per-second, or pick a faster device",
        )
    fits_elsewhere = []
    for other in alternatives:
        if other.id == profile.id:
            continue
        o_usable = int(other.memory.usable_gib * 1024**3)
        o_budget = o_usable - max(HEADROOM_MIN, int(o_usable * HEADROOM_FRACTION))
        if _estimate(fmt, q, facts, other, ctx).required_bytes <= o_budget:
            fits_elsewhere.append(other.id)
    hint = (
        f"the smallest option ({fmt} {q} at ctx {ctx}) needs {_fmt_mib(need)}: weights "
        f"{_fmt_mib(est.weights_bytes)}, KV cache {_fmt_mib(est.kv_bytes)}. "
    )
    hint += (
        f"It would fit on: {', '.join(sorted(fits_elsewhere))}"
        if fits_elsewhere
        else "No shipped device profile has room for it; pick a smaller model"
    )
    return BuildError(
        f"nothing fits {profile.id}: the smallest option, {fmt} {q} at ctx {ctx}, is "
        f"{_fmt_mib(over)} over the {_fmt_mib(budget)} available after headroom",
        hint=hint,
    )
