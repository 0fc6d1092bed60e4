"""One model file for one plan: convert (GGUF) or export (ONNX), quantize, validate against
the original, and what the manifest records of it (``ModelOutput``). ``pipeline.run_build`` calls
these once per (format, quant, kernels) key. Build side: heavy libraries load lazily."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.build.request import BuildRequest, build_stage, cache_root
from edgepack.errors import BuildError

if TYPE_CHECKING:
    from edgepack.plan.planner import Plan

# The engine a GGUF bundle is served with: the same llama-cpp-python minor series, since the
# GGUF format and the quantization kernels are stable within it.
LLAMA_ENGINE_RANGE = ">=0.3.36,<0.4"


@dataclass(frozen=True)
class ModelOutput:
    model_file: Path
    engine: dict[str, Any]
    validation: dict[str, Any]
    golden: tuple[dict[str, Any], ...]
    details: dict[str, Any]
    converter: dict[str, Any]
    extra_files: tuple[Path, ...] = ()
    tokenizer_files: tuple[Path, ...] = ()


def _golden_prompts(req: BuildRequest, kind: str) -> tuple[Any, ...]:
    """The golden prompts a build asks: explicit ``--golden``, else the defaults for chat
    models (both formats: the update agent's health gate asks what the manifest stores)."""
    from edgepack.build.gguf_validate import DEFAULT_GOLDEN, GoldenPrompt

    if req.golden is None:
        return DEFAULT_GOLDEN if kind == "chat" else ()
    return tuple(GoldenPrompt(g.prompt, g.expect) for g in req.golden)


def gguf_output(
    req: BuildRequest,
    folder: Path,
    source_id: str,
    facts: Any,
    plan: Plan,
    kind: str,
    name: str,
    log: Callable[[str], None],
    quantized: dict[str, dict[str, Any]],
) -> ModelOutput:
    from edgepack.build.gguf_convert import (
        choose_intermediate_type,
        convert_to_gguf,
        converter_version,
        installed_llama_cpp_python,
        intermediate_path,
    )
    from edgepack.build.gguf_quantize import quantize_gguf
    from edgepack.build.gguf_validate import validate_gguf

    root = cache_root()
    conv = converter_version()
    outtype = choose_intermediate_type(facts.n_params)
    inter = intermediate_path(root, source_id, outtype, converter=conv)
    if inter.is_file():
        log(f"reusing intermediate {inter.name}")
    else:
        with build_stage(log, "convert",
                         f"converting to {outtype} GGUF with convert_hf_to_gguf.py"):
            convert_to_gguf(folder, inter, outtype)
    quant = plan.quant
    threads = req.threads or os.cpu_count() or 1
    engine_version = installed_llama_cpp_python()
    qdir = root / "quantized" / f"{inter.stem}-llama-cpp-python-{engine_version}"
    model_file = qdir / f"{name}-{quant}.gguf"
    tensor_info: dict[str, Any] = {}
    if quant.lower() == outtype:
        # The intermediate is already the requested type: ship it under the bundle's name.
        qdir.mkdir(parents=True, exist_ok=True)
        model_file.unlink(missing_ok=True)
        os.link(inter, model_file)
    elif quant in quantized and model_file.is_file():
        log(f"reusing {model_file.name}, quantized earlier in this build")
        tensor_info = quantized[quant]
    else:
        with build_stage(log, "quantize", f"quantizing to {quant}"):
            qres = quantize_gguf(inter, model_file, quant, threads=threads)
        tensor_info = {
            "tensor_types": qres.type_counts,
            "fallback_tensors": len(qres.fallbacks),
            "fallback_types": qres.fallback_types,
        }
        quantized[quant] = tensor_info
    golden = _golden_prompts(req, kind)
    with build_stage(log, "validate", f"validating {quant} against the {outtype} intermediate"):
        val = validate_gguf(
            model_file,
            inter,
            quant,
            golden=golden,
            min_agreement=req.min_agreement,
            max_kl=req.max_kl,
            min_cosine=req.min_cosine,
            threads=threads,
            flash_attn=plan.flash_attn,
        )
    return ModelOutput(
        model_file=model_file,
        engine={
            "name": "llama.cpp",
            "package": "llama-cpp-python",
            "version_range": LLAMA_ENGINE_RANGE,
            "built_with": engine_version,
        },
        validation={
            "metric": val.metric,
            "value": val.value,
            "threshold": val.threshold,
            "passed": val.passed,
            "reference": val.reference,
            "details": val.details,
        },
        golden=tuple({"prompt": g.prompt, "expect": g.expect} for g in golden),
        details={"intermediate": outtype, **tensor_info},
        converter={"name": "convert_hf_to_gguf.py", "version": conv},
    )


def onnx_output(
    req: BuildRequest,
    folder: Path,
    source_id: str,
    plan: Plan,
    kind: str,
    name: str,
    log: Callable[[str], None],
) -> ModelOutput:
    from importlib.metadata import version

    from edgepack.build.onnx_export import TASKS, ExportResult, export_onnx, infer_task
    from edgepack.build.onnx_quantize import quantize_onnx
    from edgepack.build.onnx_validate import validate_onnx

    root = cache_root()
    task = infer_task(folder)
    tools = f"optimum-onnx-{version('optimum-onnx')}-onnxruntime-{version('onnxruntime')}"
    export_dir = root / "onnx" / f"{source_id}-{task}-{tools}"
    if (export_dir / "model.onnx").is_file():
        # export_onnx renames a finished export into place, so a present graph is complete.
        log(f"reusing ONNX export {export_dir.name}")
        export = ExportResult(
            out_dir=export_dir, task=task, kind=TASKS[task][1],
            model_path=export_dir / "model.onnx", tokenizer_dir=export_dir / "tokenizer",
            files=(),
        )
    else:
        with build_stage(log, "export", f"exporting to ONNX with optimum ({task})"):
            export = export_onnx(folder, export_dir, task)
    if export.kind == "classification":
        raise BuildError(
            f"{name} is a sequence-classification model; edgepack's server has no "
            "classification route yet",
            hint="build an embedding or text-generation model, or export it with optimum",
        )
    scheme = plan.quant
    qdir = root / "onnx-quantized" / f"{export_dir.name}-{scheme}"
    with build_stage(log, "quantize", f"quantizing the ONNX graph ({scheme})"):
        q = quantize_onnx(export.model_path, qdir / "model.onnx", scheme)
    threads = req.threads or os.cpu_count() or 1
    threshold = req.min_cosine if export.kind == "embedding" else req.min_agreement
    golden = _golden_prompts(req, kind) if export.kind == "generation" else ()
    with build_stage(log, "validate", f"validating {scheme} against the PyTorch model"):
        val = validate_onnx(
            folder, q.model_path, export.tokenizer_dir, kind=export.kind, scheme=scheme,
            threshold=threshold, n_threads=threads, golden=golden,
        )
    tok_files = tuple(sorted(p for p in export.tokenizer_dir.iterdir() if p.is_file()))
    return ModelOutput(
        model_file=q.model_path,
        extra_files=(q.external_data,) if q.external_data else (),
        tokenizer_files=tok_files,
        engine={
            "name": "onnxruntime",
            "package": "onnxruntime",
            "version_range": f">={version('onnxruntime')},<2",
            "built_with": version("onnxruntime"),
        },
        validation=val.to_dict(),
        golden=tuple({"prompt": g.prompt, "expect": g.expect} for g in golden),
        details={"task": task, "notes": list(q.notes), "size_bytes": q.size_bytes},
        converter={"name": "optimum-onnx", "version": version("optimum-onnx")},
    )
