"""Parallel slots for a GGUF decoder: how many sequences the server decodes together. Pure.

The batched engine (runtimes/batch.py) gives every slot ``ctx`` KV cells of its own in one
llama.cpp context, so its memory is the one-slot estimate plus, per extra slot, one more KV
cache of ``ctx`` cells and one more output row. Measured with llama-cpp-python 0.3.36 on
SmolLM2-135M at ctx 2048 (``sched_reserve`` and ``llama_kv_cache`` in llama.cpp's load log):
1 slot: KV 45.00 MiB, compute buffer 102.51 MiB, output 0.19 MiB; 4 slots: KV 180.00 MiB,
compute buffer 102.51 MiB, output 0.75 MiB. The compute buffer does not grow (its worst case
is one micro-batch of ``n_ubatch`` tokens, whatever the slots).

Choice: the most slots that fit in the memory left after the one-slot plan (headroom kept),
up to :data:`DEFAULT_MAX_SLOTS` and one slot per core. Slots share the engine's threads in
one batch; each extra sequence adds its matrix work to every step, so on a CPU more
sequences than cores stop adding throughput (an engineering rule, not measured per device).
4 is llama-server's own default for ``--parallel`` (auto). The quantization and context are
chosen first, for one slot: parallel requests never cost the answers' quality.
"""

from __future__ import annotations

from dataclasses import replace

from edgepack.device.profile import DeviceProfile
from edgepack.errors import BuildError, UsageError
from edgepack.plan.estimate import MIB, Estimate

DEFAULT_MAX_SLOTS = 4


def with_slots(est: Estimate, slots: int) -> Estimate:
    """``est`` (one slot) with KV cache and output buffer for ``slots`` sequences."""
    return replace(est, kv_bytes=est.kv_bytes * slots, output_bytes=est.output_bytes * slots,
                   slots=slots)


def choose_slots(est: Estimate, profile: DeviceProfile, budget: int,
                 requested: int | None) -> tuple[Estimate, str]:
    """(estimate for the chosen slots, why). ``est`` is the one-slot estimate that fits.

    ``requested`` (``--parallel``) is taken as asked when it fits and refused with BuildError
    (exit 5) naming what it needs and how many slots would fit when it does not.
    """
    per_slot = est.kv_bytes + est.output_bytes
    room = budget - est.required_bytes
    fit = 1 + (max(0, room) // per_slot if per_slot > 0 else DEFAULT_MAX_SLOTS)
    kv_each = f"{est.kv_bytes / MIB:,.0f} MiB of KV cache each (ctx {est.ctx})"
    if requested is not None:
        if requested < 1:
            raise UsageError(f"--parallel {requested} is not a slot count",
                             hint="use 1 or more")
        chosen = with_slots(est, requested)
        if chosen.required_bytes > budget:
            raise BuildError(
                f"--parallel {requested} does not fit {profile.id}: {requested} slots need "
                f"{chosen.required_bytes / MIB:,.0f} MiB ({kv_each}), "
                f"{(chosen.required_bytes - budget) / MIB:,.0f} MiB over the "
                f"{budget / MIB:,.0f} MiB available after headroom",
                hint=f"at most {fit} slot(s) fit at ctx {est.ctx}: use --parallel {fit}, or "
                "a smaller --ctx",
            )
        return chosen, f"{requested} parallel slot(s) as asked with --parallel ({kv_each})"
    cap = min(DEFAULT_MAX_SLOTS, max(1, profile.cpu.cores))
    n = max(1, min(cap, fit))
    if n == cap:
        why = (f"{n} parallel slot(s): one per core up to {DEFAULT_MAX_SLOTS} "
               f"(llama-server's default), {kv_each}")
    else:
        why = (f"{n} parallel slot(s): the memory left after the weights holds the KV cache "
               f"of {n} ({kv_each}); {cap} would need "
               f"{with_slots(est, cap).required_bytes / MIB:,.0f} MiB")
    return with_slots(est, n), why
