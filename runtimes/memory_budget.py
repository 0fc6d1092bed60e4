"""The memory check at start: what the bundles need together against what the machine has.

Before any model loads, ``serve`` adds up each bundle's planned memory (the manifest's
``plan.memory.required_bytes``, the planner's estimate of the serving process with the context
full, KV cache for every slot included) and compares the sum with the memory available to
this process: the kernel's ``MemAvailable``, the cgroup's ``memory.max`` less what the group
already uses (systemd's ``MemoryMax=``), and ``--memory-budget-bytes`` when given (the same
bound as the update agent's option of that name), whichever is least. When they do not fit,
the server refuses with exit 7 instead of loading until the kernel's OOM killer picks a
process.

A setting that changes the KV cache (``--ctx``, ``n_parallel``, either of them in the
device-local config file, for every model or per model) rescales the plan's KV figure to
the cells actually allocated. A bundle made without the planner has no figure: its model
files' size stands in, a lower bound, and the log says so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgepack.runtimes.config import ServerConfig

from edgepack.errors import RuntimeHealthError

MIB = 1024 * 1024


@dataclass(frozen=True)
class Need:
    """What one bundle needs, and where the figure comes from."""

    model: str
    bytes: int
    basis: str


def slots(cfg: ServerConfig) -> int:
    """Sequences the engine allocates KV cache for (runtimes/serve.py ``make_engine``)."""
    batched = cfg.model_format == "gguf" and cfg.model_kind != "embedding"
    return cfg.n_parallel if batched else 1


def bundle_need(cfg: ServerConfig) -> Need:
    """The memory ``cfg`` needs as it will be served."""
    if cfg.planned_bytes:
        need, basis = cfg.planned_bytes, "planned"
        cells = cfg.n_ctx * slots(cfg)
        if cfg.planned_kv_bytes and cfg.planned_kv_cells and cells != cfg.planned_kv_cells:
            kv = cfg.planned_kv_bytes * cells // cfg.planned_kv_cells
            need += kv - cfg.planned_kv_bytes
            basis = (f"planned, KV cache rescaled from {cfg.planned_kv_cells} to {cells} "
                     f"cells (ctx {cfg.n_ctx} x {slots(cfg)} slots)")
        return Need(cfg.model_name, need, basis)
    return Need(cfg.model_name, _model_files_bytes(cfg),
                "model files only (the manifest has no plan; a lower bound)")


def _model_files_bytes(cfg: ServerConfig) -> int:
    if cfg.model_format == "gguf":
        return os.stat(cfg.model_path).st_size
    # ONNX: the graph and its external data, in the model folder (links to held files).
    return sum(os.stat(p).st_size for p in cfg.model_path.parent.rglob("*") if p.is_file())


def cgroup_room(proc_cgroup: Path = Path("/proc/self/cgroup"),
                root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes the cgroup (v2) hierarchy still allows this process, or None when unbounded."""
    try:
        line = next((ln for ln in proc_cgroup.read_text().splitlines()
                     if ln.startswith("0::")), "")
    except OSError:
        return None
    if not line:
        return None
    group = root / line[3:].lstrip("/")
    room: int | None = None
    while True:
        try:
            limit = (group / "memory.max").read_text().strip()
            used = int((group / "memory.current").read_text().strip())
        except (OSError, ValueError):
            limit = "max"
            used = 0
        if limit != "max" and limit.isdigit():
            left = max(0, int(limit) - used)
            room = left if room is None else min(room, left)
        if group == root or root not in group.parents:
            return room
        group = group.parent


def available(budget: int | None) -> tuple[int, str]:
    """(bytes this process may still use, what bounds it)."""
    import psutil

    out = [(int(psutil.virtual_memory().available), "available memory (MemAvailable)")]
    room = cgroup_room()
    if room is not None:
        out.append((room, "the cgroup's memory.max less its current use"))
    if budget is not None:
        out.append((budget, "--memory-budget-bytes"))
    return min(out)


def check_memory(configs: Sequence[ServerConfig], budget: int | None) -> list[Need]:
    """The needs of ``configs``; RuntimeHealthError (exit 7) when together they do not fit."""
    needs = [bundle_need(c) for c in configs]
    total = sum(n.bytes for n in needs)
    room, bound = available(budget)
    if total > room:
        each = "; ".join(f"{n.model}: {n.bytes / MIB:,.0f} MiB ({n.basis})" for n in needs)
        what = "these models need" if len(needs) > 1 else "this model needs"
        raise RuntimeHealthError(
            f"not enough memory: {what} {total / MIB:,.0f} MiB together, {bound} is "
            f"{room / MIB:,.0f} MiB ({each})",
            hint="serve fewer bundles in this process, free memory, lower the context "
            "(--ctx; with several bundles a per-model n_ctx in the --config file) or slots "
            "(n_parallel), or build smaller bundles for this device",
        )
    return needs
