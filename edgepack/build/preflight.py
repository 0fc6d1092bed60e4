"""Everything ``edgepack build`` can refuse before the first byte is pulled or computed.

A build may take tens of minutes (pull, convert, quantize, validate); finding out afterwards
that ``--out`` already holds the bundle, or that a threshold was mistyped, wastes all of it.
:func:`check_request` runs after the device profiles are loaded and before any network.
Pure checks plus a few ``stat`` calls; raises :class:`edgepack.errors.UsageError` (exit 2).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.errors import UsageError

if TYPE_CHECKING:
    from edgepack.build.request import BuildRequest


def model_slug(text: str) -> str:
    """The model name as it appears in bundle folder names and /v1/models."""
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "model"


def model_name(req_name: str | None, ref: Any) -> str:
    """The served model name: --name, else the repo's leaf, else the folder's name."""
    if req_name:
        return model_slug(req_name)
    if ref.repo_id:
        return model_slug(ref.repo_id.split("/")[-1])
    path = Path(ref.path)
    # A generic leaf like model/ takes its parent's name.
    generic = {"model", "models", "hf", "weights"}
    return model_slug(path.parent.name if path.name.lower() in generic else path.name)


def check_quant(quant: str, fmt: str, where: str = "--quant") -> str:
    """The format ``quant`` implies for ``--format fmt`` (a GGUF name implies gguf); raises
    UsageError when it names none.

    Accepted: a quantization edgepack makes, or one a GGUF repo's file may hold (any llama.cpp
    file type, or the file's name): which files a repo holds is known only after its listing
    is read, and the planner then names them when none matches."""
    from edgepack.plan.gguf_header import LLAMA_FTYPES
    from edgepack.plan.quants import FILE_TYPES_BY_NAME, ONNX_QUANTS_BY_NAME

    label = quant.upper().replace("-", "_")
    q_gguf = (label in FILE_TYPES_BY_NAME or label in LLAMA_FTYPES.values()
              or quant.lower().endswith(".gguf"))
    q_onnx = quant.lower() in ONNX_QUANTS_BY_NAME
    if (fmt == "gguf" and not q_gguf) or (fmt == "onnx" and not q_onnx) or not (q_gguf or q_onnx):
        raise UsageError(
            f"{where} {quant!r} is not a {fmt if fmt != 'auto' else 'known'} quantization",
            hint="GGUF: " + ", ".join(FILE_TYPES_BY_NAME)
            + " (from a GGUF repo also any file type it holds, or a file name)"
            + "; ONNX: " + ", ".join(ONNX_QUANTS_BY_NAME),
        )
    if fmt == "auto":
        return "gguf" if q_gguf else "onnx"
    return fmt


def _check_range(option: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not (low <= value <= high):
        raise UsageError(f"{option} {value} is outside {low}..{high}",
                         hint=f"give a value between {low} and {high}")


def _writable_parent(path: Path) -> Path:
    """The nearest folder at or above ``path`` that exists (where the output will be made)."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_request(req: BuildRequest, ref: Any, profiles: Sequence[Any]) -> list[Path]:
    """Refuse a build whose options or output location cannot work; return the bundle paths.

    Checks: quantization names (and that a per-device ``--quant`` names a ``--device``),
    threshold ranges, that ``--out`` is (or can become) a writable folder, and that no bundle
    folder (or ``.tar`` with ``--archive``) is already there unless ``--overwrite``.
    """
    ids = [p.id for p in profiles]
    if req.quant is not None:
        check_quant(req.quant, req.fmt, "--quant")
    for device, quant in req.device_quants:
        if device not in req.devices and device not in ids:
            raise UsageError(
                f"--quant names device {device!r}, which is not among the --device values",
                hint=f"use one of: {', '.join(req.devices)}",
            )
        check_quant(quant, req.fmt, f"--quant {device}=")
    _check_range("--min-agreement", req.min_agreement, 0.0, 1.0)
    _check_range("--min-cosine", req.min_cosine, -1.0, 1.0)
    _check_range("--max-kl", req.max_kl, 0.0, float("inf"))

    out = Path(req.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, not a folder",
                         hint="give a folder (it is created if missing)")
    parent = _writable_parent(out)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {str(out)!r} cannot be written: {str(parent)!r} is not a "
                         "writable folder", hint="choose a folder you can write to")
    name = model_name(req.name, ref)
    paths = [out / f"{name}-{pid}" for pid in ids]
    if not req.overwrite:
        for path in paths:
            for existing in (path, *([path.with_name(path.name + ".tar")] if req.archive
                                     else [])):
                if existing.exists():
                    raise UsageError(
                        f"output {str(existing)!r} already exists",
                        hint="pass --overwrite to replace it, or --out another folder",
                    )
    return paths
