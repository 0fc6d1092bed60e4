"""The planner's typed objects across the plan -> build boundary: what the user asked for
(:class:`PlanOptions`), a GGUF repo's file as a candidate (:class:`FileChoice`), an option not
taken (:class:`Rejected`) and the decision itself (:class:`Plan`, whose ``to_dict()`` is the
stable ``plan --json`` schema the build, the manifest and ``inspect`` read). The choice is made
in :mod:`edgepack.plan.planner`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgepack.plan.estimate import Estimate
from edgepack.plan.facts import ModelFacts

PLAN_SCHEMA = 1


@dataclass(frozen=True)
class PlanOptions:
    """What the user asked for. ``None`` means "choose for me"."""

    format: str = "auto"  # auto | gguf | onnx
    ctx: int | None = None
    quant: str | None = None
    min_tokens_per_second: float | None = None
    parallel: int | None = None  # slots (GGUF decoders); None: as many as fit (plan/slots.py)
    # The build's step-up (build/step_up.py): ``quant`` is then not the user's --quant but the
    # next precision above this one, the planner's choice that failed validation.
    step_up_from: str | None = None
    # GGUF decoders: plan memory for serving with flash attention (llama.cpp's CPU default in
    # llama-server). The build plans again with False when the answers changed with it on
    # (build/step_up.py): the bundle is then served, and its memory planned, without it.
    flash_attn: bool = True


@dataclass(frozen=True)
class Rejected:
    format: str
    quant: str
    ctx: int
    reason: str
    file: str | None = None  # the repo file, when planning over a GGUF repo's files

    def to_dict(self) -> dict[str, Any]:
        out = {"format": self.format, "quant": self.quant, "ctx": self.ctx, "reason": self.reason}
        if self.file is not None:
            out["file"] = self.file
        return out


@dataclass(frozen=True)
class FileChoice:
    """A GGUF file (or set of split parts) that a repo already holds, as the planner sees it.

    ``facts`` are read from its header: every TensorFact's dtype is the ggml type stored.
    ``kld`` ranks it (see :func:`edgepack.plan.gguf_header.quality_kld`).
    """

    path: str  # the first (or only) file's path in the repo
    files: tuple[str, ...]
    quant: str
    facts: ModelFacts
    kld: float
    kld_basis: str


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
    warnings: tuple[str, ...] = ()
    low_quality: bool = False
    speed_floor: dict[str, Any] | None = None
    gguf_file: dict[str, Any] | None = None
    parallel: int = 1  # sequences the server decodes together (server.toml n_parallel)
    # llama.cpp's flash-attention kernels for a GGUF decoder (server.toml [engine] flash_attn):
    # what the build validated with and the server runs; the memory figures assume it.
    flash_attn: bool = False
    # Set by the build when the planner's choice failed validation: each quant tried before
    # this one, with the failed checks and why (build/step_up.py).
    step_up: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        e = self.estimate
        extra: dict[str, Any] = {}
        if self.gguf_file is not None:
            extra["gguf_file"] = self.gguf_file
        if self.step_up:
            extra["step_up"] = [dict(a) for a in self.step_up]
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
            "quality": {
                "metric": e.quality_metric,
                "value": e.quality_value,
                "low": self.low_quality,
            },
            "rationale": list(self.rationale),
            "rejected": [r.to_dict() for r in self.rejected],
            # additions to schema 1 (new keys after the old ones)
            "speed_floor": self.speed_floor,
            "warnings": list(self.warnings),
            "parallel": self.parallel,
            "flash_attn": self.flash_attn,
            **extra,
        }
