"""Side by side or stop-swap-start: whether a new bundle's server fits beside the running one.

The health gate normally starts the new bundle on a free port while the old one keeps
serving (side by side). On a device where both do not fit in memory, starting the second
server would push the first into swap or the OOM killer, so the agent instead stops the old
server, switches ``current``, starts the new one through the service manager and gates it
there; on failure it switches back and restarts the old one (stop-swap-start).

A bundle's need is its plan's figure (``manifest.plan.memory``): ``expected_peak_rss_bytes``
(peak RSS with the context full), else ``required_bytes``, else ``total_bytes``; a bundle
without a plan figure is estimated as its model file plus the runtime's overhead.

``plan_switch`` is pure; ``available_memory_bytes`` and ``bundle_memory_bytes`` read the
machine and the bundle. Device side: psutil (a core dependency) and the standard library.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SIDE_BY_SIDE = "side-by-side"
STOP_SWAP_START = "stop-swap-start"
_MIB = 1 << 20
# Python, uvicorn, starlette and llama-cpp-python beyond the model's bytes, as
# runtimes/systemd.py counts them for MemoryMax (about 120 MiB measured, 256 MiB with room).
RUNTIME_OVERHEAD_BYTES = 256 * _MIB
_PLAN_FIGURES = ("expected_peak_rss_bytes", "required_bytes", "total_bytes")


@dataclass(frozen=True)
class SwitchPlan:
    """How the agent brings up a new bundle, and the figures it decided on."""

    mode: str  # SIDE_BY_SIDE | STOP_SWAP_START
    new_bytes: int
    old_bytes: int | None  # None: nothing installed, nothing to stop
    budget_bytes: int
    budget_source: str  # "--memory-budget-bytes" | "available memory"
    why: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bundle_memory_bytes(manifest: Mapping[str, Any], slot: Path | None = None) -> int:
    """The memory a bundle's server needs, from its plan (see the module docstring).

    Without a plan figure: the model file's size (from the manifest's file list, or the file
    in ``slot``) plus RUNTIME_OVERHEAD_BYTES. Never raises for a missing figure.
    """
    plan = manifest.get("plan")
    memory = plan.get("memory") if isinstance(plan, Mapping) else None
    if isinstance(memory, Mapping):
        for key in _PLAN_FIGURES:
            value = memory.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    raw_model = manifest.get("model")
    model: Mapping[str, Any] = raw_model if isinstance(raw_model, Mapping) else {}
    size = model.get("size")
    if not isinstance(size, int):
        path = model.get("path")
        entry = next((f for f in manifest.get("files") or []
                      if isinstance(f, Mapping) and f.get("path") == path), None)
        size = entry.get("size") if entry else None
    if not isinstance(size, int) and slot is not None and model.get("path"):
        try:
            size = (slot / str(model["path"])).stat().st_size
        except OSError:
            size = None
    return (size if isinstance(size, int) else 0) + RUNTIME_OVERHEAD_BYTES


def available_memory_bytes() -> int:
    """Memory the kernel could give a new process now without swapping (MemAvailable)."""
    import psutil

    return int(psutil.virtual_memory().available)


def plan_switch(new_bytes: int, old_bytes: int | None, *, budget_bytes: int | None = None,
                available_bytes: int | None = None) -> SwitchPlan:
    """Choose side by side or stop-swap-start (pure).

    With ``budget_bytes`` (the memory the servers may use together, e.g. from
    ``--memory-budget-bytes``) both must fit: ``old + new <= budget``. Without it, the new
    one must fit in ``available_bytes``: the running old server's memory is already outside
    what is available. With nothing installed there is nothing to stop: side by side.
    """
    if budget_bytes is not None:
        budget, source = budget_bytes, "--memory-budget-bytes"
        need = new_bytes + (old_bytes or 0)
        need_text = (f"old {old_bytes} + new {new_bytes} = {need} bytes"
                     if old_bytes is not None else f"new {new_bytes} bytes")
    else:
        if available_bytes is None:
            raise ValueError("plan_switch needs budget_bytes or available_bytes")
        budget, source = available_bytes, "available memory"
        need = new_bytes
        need_text = f"new {new_bytes} bytes beside the running server"
    if old_bytes is None:
        return SwitchPlan(SIDE_BY_SIDE, new_bytes, None, budget, source,
                          "nothing installed: no server to stop")
    fits = need <= budget
    return SwitchPlan(
        SIDE_BY_SIDE if fits else STOP_SWAP_START, new_bytes, old_bytes, budget, source,
        f"{need_text} {'fit' if fits else 'do not fit'} in {source} ({budget} bytes)",
    )
