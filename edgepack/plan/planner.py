"""The planner: a pure function of (model facts, device profile, options) -> Plan.

No I/O. The memory and speed models and their calibration live in :mod:`edgepack.plan.estimate`,
the plan's types in :mod:`edgepack.plan.plan_types`, the headroom and the texts that explain a
choice or its absence in :mod:`edgepack.plan.explain`; this module makes the choice: every option
it did not take is listed with the reason (does not fit by X MiB, slower than
--min-tokens-per-second, lower quality than chosen).

Choice, in this order of preference:

1. quantizations of Q4 quality or better (KL divergence at most Q4_0's in llama.cpp's published
   table, see :mod:`edgepack.plan.quants`), at the requested context; if none fits, the context
   is halved (down to 512 tokens) before anything below Q4 is considered -- a short context
   is a smaller loss than Q3/Q2 text;
2. among those that fit, the best quality whose estimated decode speed reaches the speed
   floor: ``--min-tokens-per-second``, or by default the device class's interactive floor
   (reading speed, :data:`READING_SPEED_TPS`). When nothing reaches a *default* floor, the
   fastest option of the tier is taken (the best quality within 10 % of it) and the plan
   warns; an explicit floor that nothing reaches is an error;
3. Q3/Q2 only when nothing of Q4 quality fits at any context; flagged ``low_quality`` with a
   warning.

If nothing fits, BuildError (exit 5) names the smallest option, by how much it misses, and
what would fit. For a GGUF repo (``files``), the options are the repo's files, each estimated
from its own header (exact tensor types and sizes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgepack.device.profile import (
    DeviceProfile,
    effective_bandwidth_gbps,
    profile_digest,
)
from edgepack.errors import UsageError
from edgepack.plan.estimate import (
    CUDA_RUNTIME_OVERHEAD,
    MIB,
    Estimate,
    estimate_gguf,
    estimate_onnx,
    gpu_offload,
    repacks_q4_0,
    speed_basis,
)
from edgepack.plan.explain import (
    HEADROOM_FRACTION,  # noqa: F401 - re-exported
    HEADROOM_MIN,  # noqa: F401 - re-exported
    fmt_mib,
    headroom_for,
    nothing_fits,
    quant_rationale,
)
from edgepack.plan.facts import ModelFacts
from edgepack.plan.plan_types import (  # noqa: F401 - re-exported: build, cli, tests use them
    PLAN_SCHEMA,
    FileChoice,
    Plan,
    PlanOptions,
    Rejected,
)
from edgepack.plan.quants import (
    FILE_TYPES,
    FILE_TYPES_BY_NAME,
    ONNX_QUANTS,
    file_type,
    higher_precision,
)
from edgepack.plan.slots import choose_slots

DEFAULT_CTX = 4096
MIN_CTX = 512
# The interactive speed floor: silent reading speed. Adults read English non-fiction at 238
# words/min on average (Brysbaert 2019, "How many words do we read per minute?", Journal of
# Memory and Language 109:104047) = 3.97 words/s; at OpenAI's rule of thumb of 100 tokens per
# 75 words (https://help.openai.com/en/articles/4936856) that is 5.3 tokens/s, rounded to 5.
# Slower than this, a reader waits for the text. Every shipped device class is used by a
# person reading a chat today, so all share it; the table lets a class differ.
READING_SPEED_TPS = 5.0
INTERACTIVE_FLOOR_TPS: dict[str, float] = {
    "sbc": READING_SPEED_TPS,
    "jetson": READING_SPEED_TPS,
    "mini-pc": READING_SPEED_TPS,
    "laptop": READING_SPEED_TPS,
    "desktop": READING_SPEED_TPS,
    "server": READING_SPEED_TPS,
}
# Above this KL divergence a quantization is flagged low quality: anything below Q4_0 in
# llama.cpp's LLaMA 3 8B scoreboard (Q4_0: 0.0719, Q3_K_M: 0.1019, Q2_K: 0.4451).
LOW_QUALITY_KLD = FILE_TYPES_BY_NAME["Q4_0"].kld
# When nothing reaches a default floor: options within this fraction of the fastest count as
# equally fast (the speed model's own error is larger than 10 %).
NEAR_FASTEST = 0.90

DEFAULT_OPTIONS = PlanOptions()  # choose everything


@dataclass(frozen=True)
class _Choice:
    quant: str
    kld: float
    low: bool
    file: str | None = None
    files: tuple[str, ...] = ()
    facts: ModelFacts | None = None  # a stored file's own facts
    kld_basis: str = "llama.cpp scoreboard"
    fmt: str = "gguf"
    base: ModelFacts | None = None

    def estimate(self, profile: DeviceProfile, ctx: int, flash_attn: bool = True) -> Estimate:
        if self.facts is not None:
            return estimate_gguf(self.facts, profile, self.quant, ctx, stored_kld=self.kld,
                                 flash_attn=flash_attn)
        assert self.base is not None
        return _estimate(self.fmt, self.quant, self.base, profile, ctx, flash_attn)


def planned_format(facts: ModelFacts, profile: DeviceProfile, options: PlanOptions) -> str:
    """The format ``plan_build`` will choose for ``facts`` (gguf or onnx); raises UsageError
    for an unknown ``options.format``."""
    return _format_for(facts, profile, options)[0]


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


def _choices(
    fmt: str,
    facts: ModelFacts,
    profile: DeviceProfile,
    forced: str | None,
    files: Sequence[FileChoice],
) -> list[_Choice]:
    """What may be chosen, best quality first."""
    if files:
        ranked = sorted(files, key=lambda f: (f.kld, f.path))
        out = [_Choice(f.quant, f.kld, _low_quality(f.kld), f.path, f.files, f.facts,
                       f.kld_basis) for f in ranked]
        if forced is not None:
            out = [c for c in out if _names_file(forced, c.quant, c.files)]
            if not out:
                raise UsageError(
                    f"--quant {forced!r}: the repo holds no such GGUF file",
                    hint="give a quantization or a file name of those it has: " + ", ".join(
                        f"{f.quant} ({f.path})" for f in ranked),
                )
        return out
    if fmt == "gguf":
        fts = FILE_TYPES if forced is None else (file_type(forced),)
        return [_Choice(ft.name, ft.kld, _low_quality(ft.kld), base=facts) for ft in fts]
    names = [q.name for q in ONNX_QUANTS]
    if forced is not None:
        q = forced.lower()
        if q not in names:
            raise UsageError(
                f"unknown ONNX quantization {forced!r}", hint=f"use {', '.join(names)}"
            )
        names = [q]
    return [_Choice(n, 0.0, False, fmt="onnx", base=facts) for n in names]


def _names_file(forced: str, quant: str, files: Sequence[str]) -> bool:
    """True when ``--quant`` names this file of a GGUF repo: its quantization label (any case,
    ``-`` for ``_``), or the path or file name of the file or of one of its split parts."""
    if forced.upper().replace("-", "_") == quant.upper():
        return True
    return any(forced in (p, p.rsplit("/", 1)[-1]) for p in files)


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
    fmt: str, quant: str, facts: ModelFacts, profile: DeviceProfile, ctx: int,
    flash_attn: bool = True,
) -> Estimate:
    if fmt == "gguf":
        return estimate_gguf(facts, profile, quant, ctx, flash_attn=flash_attn)
    return estimate_onnx(facts, profile, quant, ctx)


def _skip_reason(
    fmt: str, quant: str, profile: DeviceProfile, forced: bool, choices: Sequence[_Choice]
) -> str | None:
    """Options never worth choosing unless asked for by name."""
    if forced:
        return None
    has_q8 = any(c.quant == "Q8_0" for c in choices) or all(c.file is None for c in choices)
    if fmt == "gguf" and quant in ("F16", "BF16", "F32") and has_q8:
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
            "int8 (8-bit weights) is 3.7x smaller at MiniLM cosine 0.999 against PyTorch "
            "(bench/onnx); fp32 is larger but encodes batches faster on x86 CPUs (bench/onnx); "
            "ask with --quant fp32"
        )
    return None


def _floor_for(profile: DeviceProfile, options: PlanOptions) -> tuple[float, bool, str]:
    """(tok/s floor, given explicitly?, where it comes from)."""
    if options.min_tokens_per_second is not None:
        return options.min_tokens_per_second, True, "--min-tokens-per-second"
    tps = INTERACTIVE_FLOOR_TPS.get(profile.device_class, READING_SPEED_TPS)
    return tps, False, f"the interactive floor of a {profile.device_class} device ({tps:g} tok/s)"


def _low_quality(kld: float) -> bool:
    return kld > LOW_QUALITY_KLD


def plan_build(
    facts: ModelFacts,
    profile: DeviceProfile,
    options: PlanOptions = DEFAULT_OPTIONS,
    *,
    alternatives: Sequence[DeviceProfile] = (),
    files: Sequence[FileChoice] = (),
) -> Plan:
    """Choose format, quant, context, threads and offload for ``facts`` on ``profile``.

    ``files``: the GGUF files a repo already holds (a GGUF repo); the plan then picks one of
    them instead of a quantization to make. ``alternatives`` are other device profiles, used
    only to say what would fit when nothing does. Raises UsageError for impossible options and
    BuildError (exit 5) when no option fits the device or meets ``min_tokens_per_second``.

    Order of preference: quantizations of Q4 quality or better at the largest context that
    fits (shrinking the context before going below Q4), best quality first unless it misses
    the speed floor; Q3/Q2 only when nothing of Q4 quality fits at any context, flagged as low
    quality. A default floor (not asked for) that nothing reaches picks the fastest option of
    Q4 quality or better rather than failing.
    """
    if files:
        if options.format == "onnx":
            raise UsageError(
                "--format onnx cannot be built from a GGUF repo",
                hint="drop --format, or use the repo of the original safetensors checkpoint",
            )
        fmt, fmt_reason = "gguf", "the repo holds GGUF files: one of them is chosen as is"
    else:
        fmt, fmt_reason = _format_for(facts, profile, options)
    choices = _choices(fmt, facts, profile, options.quant, files)
    forced = options.quant is not None
    ladder = _ctx_ladder(facts, fmt, options)
    if forced and options.ctx is not None:
        ladder = ladder[:1]  # both pinned: no silent shrinking
    usable = int(profile.memory.usable_gib * 1024**3)
    headroom = headroom_for(usable)
    budget = usable - headroom
    floor, explicit_floor, floor_source = _floor_for(profile, options)

    rejected: list[Rejected] = []
    smallest: tuple[int, str, int, Estimate] | None = None
    chosen: tuple[_Choice, int, Estimate] | None = None
    fastest: tuple[float, str] | None = None  # among options that fit, for the error message
    below_floor: tuple[_Choice, int, Estimate] | None = None  # fastest of Q4+ that fits
    tiers = [[c for c in choices if not c.low], [c for c in choices if c.low]]
    for tier in tiers:
        for ctx in ladder:
            tried: list[Rejected] = []
            fit_here: list[tuple[_Choice, Estimate]] = []
            for c in tier:
                skip = _skip_reason(fmt, c.quant, profile, forced, choices)
                if skip:
                    tried.append(Rejected(fmt, c.quant, ctx, skip, c.file))
                    continue
                est = c.estimate(profile, ctx, options.flash_attn)
                over = est.required_bytes - budget
                if smallest is None or est.required_bytes < smallest[0]:
                    smallest = (est.required_bytes, c.quant, ctx, est)
                if over > 0:
                    tried.append(
                        Rejected(
                            fmt,
                            c.quant,
                            ctx,
                            f"does not fit: needs {fmt_mib(est.required_bytes)}, "
                            f"{fmt_mib(over)} over the {fmt_mib(budget)} left after "
                            f"{fmt_mib(headroom)} headroom",
                            c.file,
                        )
                    )
                    continue
                speed = _speed(est)
                fit_here.append((c, est))
                if fastest is None or speed > fastest[0]:
                    fastest = (speed, c.quant)
                if speed < floor and (explicit_floor or not forced):
                    tried.append(
                        Rejected(
                            fmt,
                            c.quant,
                            ctx,
                            f"too slow: about {speed:.1f} tok/s, below {floor_source}",
                            c.file,
                        )
                    )
                    continue
                chosen = (c, ctx, est)
                break
            rejected.extend(tried)
            if chosen is not None:
                break
            if fit_here and not explicit_floor and below_floor is None:
                # The best quality within 10 % of the fastest: where decoding is compute-bound
                # a smaller file buys no speed, so it should not cost quality.
                top = max(_speed(e) for _, e in fit_here)
                best = next(ce for ce in fit_here if _speed(ce[1]) >= NEAR_FASTEST * top)
                below_floor = (best[0], ctx, best[1])
        if chosen is not None:
            break
        if below_floor is not None:
            # A default floor is advice: keep this tier's quality at the fastest option that fits
            # rather than trading to Q3/Q2 or failing.
            chosen = below_floor
            rejected[:] = [r for r in rejected
                           if not (r.quant == chosen[0].quant and r.file == chosen[0].file
                                   and r.ctx == chosen[1])]
            break
    if chosen is None:
        def on(other: DeviceProfile, q: str, ctx: int) -> Estimate:
            stored = next((f for f in files if f.quant == q), None)
            if stored is not None:
                return estimate_gguf(stored.facts, other, q, ctx, stored_kld=stored.kld,
                                     flash_attn=options.flash_attn)
            return _estimate(fmt, q, facts, other, ctx, options.flash_attn)

        raise nothing_fits(facts.architecture, profile, fmt, smallest, budget, fastest,
                           alternatives, floor, on)

    c, ctx, est = chosen
    q = c.quant
    chosen_rank = choices.index(c)
    for lower in choices[chosen_rank + 1 :]:
        if not any(r.quant == lower.quant and r.file == lower.file for r in rejected):
            rejected.append(Rejected(fmt, lower.quant, ctx, f"lower quality than {q}", lower.file))
    rationale = [fmt_reason]
    warnings: list[str] = []
    speed = _speed(est)
    rationale += quant_rationale(fmt, q, c.kld_basis, est, forced, floor_source,
                                 speed >= floor, options.step_up_from)
    if c.file is not None:
        rationale.append(f"file {c.file}" + (f" (+{len(c.files) - 1} split parts)"
                                             if len(c.files) > 1 else ""))
    if c.low:
        warnings.append(
            f"{q} is low quality (KLD {est.quality_value:g} vs FP16 on LLaMA 3 8B, llama.cpp "
            "scoreboard; Q4_0 is 0.072): expect wrong facts and broken text; a device with "
            "more memory or a smaller model is the better fix"
        )
    if speed < floor and not forced and fmt == "gguf" and facts.family == "decoder":
        warnings.append(
            f"about {speed:.1f} tok/s, below {floor_source}: "
            + ("nothing that fits" if c.low else "nothing of Q4 quality or better")
            + " reaches it here; this is the fastest such option (a smaller model would be "
            "faster; --min-tokens-per-second 0 prefers quality)"
        )
    basis = speed_basis(profile, est) if fmt == "gguf" else {}
    for key, what in (("memory.measured_bandwidth_gbps", "memory bandwidth "
                       f"({effective_bandwidth_gbps(profile):g} GB/s)"),
                      ("cpu.measured_decode_gflops", "llama.cpp's decode compute rate")):
        source = profile.sources.get(key, "")
        if "while busy" in source:
            warnings.append(
                f"{what} was {source}; speed estimates and the choice they drive are "
                "pessimistic: plan again when the machine is idle")
    if basis and facts.family == "decoder" and not gpu_offload(c.facts or facts, profile, est):
        rationale.append(
            f"decode estimate from a compute rate of {basis['decode_gflops']:g} GFLOPS "
            f"({basis['compute_basis']}) and {basis['effective_bandwidth_gbps']:g} GB/s of "
            f"memory bandwidth ({basis['bandwidth_basis']}); prompt estimate from "
            f"{basis['prompt_gflops']:g} GFLOPS ({basis['prompt_basis']})")
    requested = ladder[0]
    if ctx != requested:
        rationale.append(
            f"context shrunk from {requested} to {ctx} tokens: nothing of Q4 quality or better "
            f"fit at {requested} (see rejected options)"
            if not c.low
            else f"context shrunk from {requested} to {ctx} tokens: nothing fit at {requested}"
        )
    elif options.ctx is None and facts.family == "decoder":
        rationale.append(
            f"context {ctx}: min(model maximum {facts.max_context}, default {DEFAULT_CTX})"
        )
    rationale.append(f"{profile.cpu.cores} threads: one per physical core")
    if fmt == "gguf" and facts.family == "decoder":
        rationale.append(
            "flash attention on (llama-server's CPU default): less memory at long contexts; "
            "the build validates with it and serves without it only if the answers change"
            if options.flash_attn else
            "flash attention off: the answers changed with it on (validation), so the bundle "
            "is validated and served without it, and its memory planned for that")
    if fmt == "gguf" and facts.family == "decoder":
        est, why_slots = choose_slots(est, profile, budget, options.parallel)
        rationale.append(why_slots)
    elif options.parallel not in (None, 1):
        raise UsageError(
            f"--parallel {options.parallel}: parallel slots are for GGUF chat and completion "
            f"models; this plan is {fmt} for a{'n' if facts.family == 'encoder' else ''} "
            f"{facts.family}", hint="drop --parallel")
    layers = gpu_offload(c.facts or facts, profile, est) if fmt == "gguf" else 0
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
            f"kernels); the file's pages ({fmt_mib(est.repack_duplicate_bytes)}) stay as "
            "reclaimable page cache"
        )
    elif fmt == "gguf" and q == "Q4_0" and not repacks_q4_0(profile):
        rationale.append("no dotprod/i8mm/AVX2 here: llama.cpp does not repack Q4_0 on this CPU")
    rationale.append(
        f"memory: {fmt_mib(est.required_bytes)} of {fmt_mib(usable)} usable "
        f"({fmt_mib(headroom)} kept as headroom)"
    )
    if not forced and not files and higher_precision(fmt, q):
        rationale.append(
            f"if {q} fails validation, the build steps up to the next higher precision that "
            "fits (not with --quant)"
        )
    return Plan(
        model=facts.to_dict(),
        device={
            "id": profile.id,
            "name": profile.name,
            "digest": profile_digest(profile),
            "effective_bandwidth_gbps": effective_bandwidth_gbps(profile),
            **{k: v for k, v in basis.items() if k != "effective_bandwidth_gbps"},
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
        warnings=tuple(warnings),
        low_quality=c.low,
        speed_floor={"tokens_per_second": floor, "source": floor_source,
                     "met": speed >= floor},
        parallel=est.slots,
        flash_attn=fmt == "gguf" and facts.family == "decoder" and options.flash_attn,
        gguf_file=None if c.file is None else {
            "path": c.file, "files": list(c.files), "quant": q,
            "quality_basis": c.kld_basis,
        },
    )


def step_up_skip(fmt: str, quant: str, *, profile: DeviceProfile) -> str | None:
    """Why the build's step-up passes over ``quant`` on ``profile``: only what the device cannot
    run well (fp16 ONNX on a CPU), not the planner's size preferences (fp32, F16)."""
    if fmt == "onnx" and quant == "fp16" and profile.accelerator.kind == "none":
        return _skip_reason(fmt, quant, profile, False, ())
    return None


def _speed(est: Estimate) -> float:
    return est.decode_tps if est.decode_tps is not None else est.prompt_tps
