"""How the planner explains itself: the memory it keeps free, why a quantization was chosen,
and the error when nothing fits (which option came closest and where it would fit). Pure
functions of the planner's figures; the choice itself is :mod:`edgepack.plan.planner`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from edgepack.device.profile import DeviceProfile
from edgepack.errors import BuildError
from edgepack.plan.estimate import MIB, Estimate

# Kept free on top of the estimate: 10% of usable memory, at least 256 MiB, for what the
# estimate cannot see (page cache for the model file's first read, allocator fragmentation).
HEADROOM_FRACTION = 0.10
HEADROOM_MIN = 256 * MIB


def headroom_for(usable: int) -> int:
    """Bytes kept free of ``usable`` bytes."""
    return max(HEADROOM_MIN, int(usable * HEADROOM_FRACTION))


def fmt_mib(n: int) -> str:
    return f"{n / MIB:,.0f} MiB"


def quant_rationale(
    fmt: str,
    q: str,
    kld_basis: str,
    est: Estimate,
    forced: bool,
    floor_source: str,
    met: bool,
    step_up_from: str | None = None,
) -> list[str]:
    """Why the plan's quantization ``q``: asked for, stepped up by the build, or the planner's
    choice against the speed floor (with its quality figure for GGUF)."""
    if step_up_from is not None and step_up_from != q:
        return [f"{q}: stepped up by the build from the planner's {step_up_from}, which failed "
                "validation (see step_up)"]
    if forced and step_up_from is None:
        return [f"{q} as asked with --quant"]
    if met:
        why = f"{q}: the highest-quality option that fits with headroom"
        if fmt == "gguf" or est.decode_tps is not None:
            why += f" and reaches {floor_source}"
    else:
        why = f"{q}: the fastest option of Q4 quality or better that fits"
    if fmt == "gguf":
        why += f" (KLD {est.quality_value:g} vs FP16 on LLaMA 3 8B, {kld_basis})"
    if step_up_from == q:  # the build's second plan of the planner's choice (build/step_up.py)
        why += "; planned again by the build without flash attention (see step_up)"
    return [why]


def nothing_fits(
    architecture: str,
    profile: DeviceProfile,
    fmt: str,
    smallest: tuple[int, str, int, Estimate] | None,
    budget: int,
    fastest: tuple[float, str] | None,
    alternatives: Sequence[DeviceProfile],
    floor: float,
    estimate_on: Callable[[DeviceProfile, str, int], Estimate],
) -> BuildError:
    """The error (exit 5) when no option fits ``profile``: the smallest option, by how much it
    misses, and which other device profiles it would fit (``estimate_on(profile, quant,
    ctx)``); or, when options fit but none reaches ``floor``, the fastest of them."""
    if smallest is None:
        return BuildError(
            f"no {fmt} option was left to try for {profile.id}",
            hint="drop --quant or pick another --format",
        )
    need, q, ctx, est = smallest
    over = need - budget
    if over <= 0:
        fast = (
            f" (fastest that fits: {fastest[1]}, about {fastest[0]:.1f} tok/s)" if fastest else ""
        )
        return BuildError(
            f"no {fmt} build of {architecture} reaches {floor:g} tok/s on {profile.id}"
            + fast,
            hint="lower --min-tokens-per-second, or pick a faster device",
        )
    fits_elsewhere = []
    for other in alternatives:
        if other.id == profile.id:
            continue
        o_usable = int(other.memory.usable_gib * 1024**3)
        o_budget = o_usable - headroom_for(o_usable)
        other_est = estimate_on(other, q, ctx)
        if other_est.required_bytes <= o_budget:
            fits_elsewhere.append(other.id)
    hint = (
        f"the smallest option ({fmt} {q} at ctx {ctx}) needs {fmt_mib(need)}: weights "
        f"{fmt_mib(est.weights_bytes)}, KV cache {fmt_mib(est.kv_bytes)}. "
    )
    hint += (
        f"It would fit on: {', '.join(sorted(fits_elsewhere))}"
        if fits_elsewhere
        else "No shipped device profile has room for it; pick a smaller model"
    )
    return BuildError(
        f"nothing fits {profile.id}: the smallest option, {fmt} {q} at ctx {ctx}, is "
        f"{fmt_mib(over)} over the {fmt_mib(budget)} available after headroom",
        hint=hint,
    )
