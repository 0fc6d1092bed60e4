"""The human view of a Plan: a rich table with the memory breakdown, speed, rationale and the
options the planner rejected. Rendering only; the decision lives in :mod:`edgepack.plan.planner`."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from edgepack.plan.estimate import MIB
from edgepack.plan.planner import Plan


def _mib(n: int) -> str:
    return f"{n / MIB:,.0f} MiB"


def render_plan(plan: Plan, console: Console) -> None:
    """Print ``plan`` as tables to ``console``."""
    e = plan.estimate
    m = plan.model
    title = Text(
        f"edgepack plan: {m['architecture']} ({m['n_params'] / 1e6:,.0f}M params) "
        f"on {plan.device['id']}",
        style="bold",
    )
    head = Table(show_header=False)
    head.add_column(style="bold")
    head.add_column()
    head.add_row("format / engine", f"{plan.format} / {plan.engine}")
    head.add_row(
        "quantization",
        plan.quant
        + (
            f" ({e.fallback_tensors} tensors fall back to 32-block types)"
            if e.fallback_tensors
            else ""
        ),
    )
    if plan.low_quality:
        head.add_row("quality", Text("LOW (below Q4)", style="bold red"))
    if plan.gguf_file is not None:
        head.add_row("repo file", plan.gguf_file["path"])
    head.add_row("context", f"{plan.ctx} tokens")
    if plan.format == "gguf" and plan.model.get("family") == "decoder":
        head.add_row("parallel slots", f"{plan.parallel} (KV cache for each)")
    head.add_row("threads / batch / ubatch", f"{plan.threads} / {plan.batch} / {plan.ubatch}")
    head.add_row("GPU layers", str(plan.gpu_layers))
    decode = "n/a (encoder)" if e.decode_tps is None else f"~{e.decode_tps:,.1f} tok/s"
    head.add_row("decode", decode)
    head.add_row("prompt", f"~{e.prompt_tps:,.0f} tok/s")

    mem = Table(title="memory", title_justify="left")
    mem.add_column("part")
    mem.add_column("size", justify="right")
    for label, value in (
        ("weights", e.weights_bytes),
        ("KV cache" + (" (f16)" if plan.format == "gguf" else "")
         + (f", {e.slots} slots x {plan.ctx}" if e.slots > 1 else ""), e.kv_bytes),
        ("compute buffers", e.compute_bytes),
        ("output buffer", e.output_bytes),
        ("runtime overhead", e.overhead_bytes),
    ):
        mem.add_row(label, _mib(value))
    mem.add_row(Text("required", style="bold"), Text(_mib(e.required_bytes), style="bold"))
    mem.add_row("headroom kept", _mib(plan.headroom_bytes))
    mem.add_row("usable on device", _mib(plan.usable_bytes))
    if e.repack_duplicate_bytes:
        mem.add_row(
            "(+ reclaimable page cache of repacked weights)", _mib(e.repack_duplicate_bytes)
        )

    warn = Table(title="warnings", title_justify="left", show_header=False)
    warn.add_column(style="yellow")
    for line in plan.warnings:
        warn.add_row(f"! {line}")

    why = Table(title="why", title_justify="left", show_header=False)
    why.add_column()
    for line in plan.rationale:
        why.add_row(f"- {line}")

    rej = Table(title="rejected options", title_justify="left")
    rej.add_column("option")
    rej.add_column("ctx", justify="right")
    rej.add_column("reason")
    for r in plan.rejected:
        rej.add_row(f"{r.format} {r.quant}" + (f" ({r.file})" if r.file else ""),
                    str(r.ctx), r.reason)
    parts: list[Any] = [title, head, mem] + ([warn] if plan.warnings else []) + [why]
    parts += [rej] if plan.rejected else []
    console.print(Group(*parts))
