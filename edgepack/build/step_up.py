"""Step up precision when the planner's own quantization fails validation.

The planner picks a quantization from memory and speed; only the build can tell whether the
converted model still answers like the original. When the planner chose (no ``--quant`` for
the device) and validation fails (:class:`~edgepack.errors.ValidationFailed` only: never a
conversion, disk or network error), the device is re-planned at the next higher precision of
the same format, from the planner's own tables (:func:`edgepack.plan.quants.higher_precision`),
with that quant asked explicitly so the planner's memory check applies, at the planned context.
That stops at the top precision, at the first the planner refuses (does not fit, misses an
explicit speed floor), or at the first that misses a default speed floor the planned choice
met. Every attempt goes into the plan's ``step_up`` record (the manifest, ``edgepack
inspect``). With ``--quant`` a failure fails the build, as asked.

Before a step up, a GGUF decoder planned with flash attention (llama-server's CPU default; the
server runs what the build validated, server.toml's ``flash_attn``) is validated once more at
the same quant without it, planned again for that (its memory is larger at long contexts, so
it may not fit at the planned context): flash attention changes a near-tie greedy answer now and
then (SmolLM2-135M Q8_0 answers "L'Étoile..." with it, "Paris" without), and a smaller model
with slower kernels beats a larger one. That also holds with ``--quant``: the user chose the
quant, not the kernels.

Outputs are shared by (format, quant, flash attention) across devices, and so are failures: a
second device planned at a quant that already failed steps up without converting it again,
and reuses an output another device already has at the higher precision.

GGUF-repository builds (:mod:`edgepack.build.gguf_repo_build`) step up the same way along the
repo's own files of higher precision (``ladder``), each re-planned from its header and
downloaded only when it is tried.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from edgepack.errors import BuildError, ValidationFailed
from edgepack.plan.quants import higher_precision

if TYPE_CHECKING:
    from edgepack.plan.planner import Plan

MIB = 1 << 20


@dataclass(frozen=True)
class Attempt:
    """One quantization tried and not shipped: the failed checks and what they measured."""

    quant: str
    flash_attn: bool  # validated with llama.cpp's flash-attention kernels
    # e.g. ("golden",), ("greedy_token_agreement",); ("plan",): the planner refused it (does
    # not fit, misses an explicit speed floor); ("speed",): misses the floor the plan met;
    # ("skipped",): the device cannot run it well
    checks: tuple[str, ...]
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"quant": self.quant, "flash_attn": self.flash_attn, "failed": list(self.checks),
                "message": self.message}


Key = tuple[str, str, bool]  # (format, quant, flash attention)


class Replan(Protocol):
    def __call__(self, quant: str, planned: str | None, *, flash_attn: bool = True) -> Plan:
        """Plan the device again with ``quant`` asked for (``planned``: the planner's own
        choice, or None with --quant); raises BuildError when it does not fit or misses an
        explicit speed floor."""


def output_for(
    plan: Plan,
    *,
    forced: bool,
    outputs: dict[Key, Any],
    failures: dict[Key, ValidationFailed],
    make: Callable[[Plan], Any],
    replan: Replan,
    step_up_skip: Callable[[str], str | None],
    log: Callable[[str], None],
    ladder: Sequence[str] | None = None,
) -> tuple[Plan, Any]:
    """The output (``make``'s result) for ``plan``, stepping up when it fails validation.

    ``replan`` plans the device again (see :class:`Replan`); ``step_up_skip(quant)`` says why a
    quant is passed over on this device (None: try it); ``ladder`` the quants to step up
    through, next first (default: the planner's table above ``plan.quant``,
    :func:`~edgepack.plan.quants.higher_precision`). Returns the plan actually built (with
    ``step_up`` set when it differs from ``plan``) and its output. Raises the validation
    failure itself when ``forced`` (after the try without flash attention), else BuildError
    (exit 5) listing every attempt once nothing is left to try.
    """
    attempts: list[Attempt] = []
    steps = iter(() if forced else higher_precision(plan.format, plan.quant)
                 if ladder is None else ladder)
    current = plan
    while True:
        try:
            out = _make_once(current, outputs, failures, make)
        except ValidationFailed as e:
            attempts.append(Attempt(current.quant, current.flash_attn, e.checks, e.summary))
            plain = _without_flash_attn(current, plan, forced, attempts, replan)
            if plain is not None:
                log(f"{current.quant} failed validation with flash attention: {e.summary}; "
                    f"validating {current.quant} without it")
                current = plain
                continue
            if forced:
                raise
            nxt = _next_plan(plan, steps, attempts, replan, step_up_skip)
            if nxt is None:
                raise _all_failed(plan, attempts, e) from e
            budget = nxt.usable_bytes - nxt.headroom_bytes
            log(f"{current.quant} failed validation: {e.summary}; trying {nxt.quant} (fits: "
                f"{nxt.estimate.required_bytes / MIB:,.0f} MiB of {budget / MIB:,.0f} MiB)")
            current = nxt
            continue
        if attempts:
            current = replace(current, step_up=tuple(a.to_dict() for a in attempts))
        return current, out


def _make_once(plan: Plan, outputs: dict[Key, Any], failures: dict[Key, ValidationFailed],
               make: Callable[[Plan], Any]) -> Any:
    """One output per (format, quant, kernels) for all devices; a validation failure is kept
    too."""
    key = (plan.format, plan.quant, plan.flash_attn)
    if key in failures:
        raise failures[key]
    if key not in outputs:
        try:
            outputs[key] = make(plan)
        except ValidationFailed as e:
            failures[key] = e
            raise
    return outputs[key]


def _without_flash_attn(current: Plan, planned: Plan, forced: bool, attempts: list[Attempt],
                        replan: Replan) -> Plan | None:
    """``current`` planned again without flash attention, or None (it had none, or does not
    fit without it: the reason is then the last attempt)."""
    if not current.flash_attn:
        return None
    try:
        return replan(current.quant, None if forced else planned.quant, flash_attn=False)
    except BuildError as e:
        attempts.append(Attempt(current.quant, False, ("plan",), e.message))
        return None


def _next_plan(
    planned: Plan,
    ladder: Iterable[str],
    attempts: list[Attempt],
    replan: Replan,
    step_up_skip: Callable[[str], str | None],
) -> Plan | None:
    """The next quant up that the planner accepts, or None (the reason is the last attempt)."""
    for quant in ladder:
        skip = step_up_skip(quant)
        if skip is not None:
            attempts.append(Attempt(quant, planned.flash_attn, ("skipped",), skip))
            continue
        try:
            nxt = replan(quant, planned.quant)
        except BuildError as e:
            attempts.append(Attempt(quant, planned.flash_attn, ("plan",), e.message))
            return None
        floor = planned.speed_floor or {}
        if floor.get("met") and not (nxt.speed_floor or {}).get("met"):
            speed = nxt.estimate.decode_tps or nxt.estimate.prompt_tps
            attempts.append(Attempt(quant, planned.flash_attn, ("speed",),
                                    f"about {speed:.1f} tok/s, below {floor.get('source')} "
                                    f"that {planned.quant} reaches"))
            return None
        return nxt
    return None


def _all_failed(planned: Plan, attempts: list[Attempt], last: ValidationFailed) -> BuildError:
    tried = "; ".join(f"{a.quant}{' with flash attention' if a.flash_attn else ''} "
                      f"({', '.join(a.checks)}): {a.message}" for a in attempts)
    return BuildError(
        f"no {planned.format} quantization for {planned.device['id']} passed validation, "
        f"stepping up from the planned {planned.quant}: {tried}",
        hint=last.hint,
    )
