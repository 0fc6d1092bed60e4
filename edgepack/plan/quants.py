"""Quantization tables: ggml tensor types, llama.cpp file types and their per-tensor rules, ONNX.

Pure data and pure functions. The per-tensor rules reproduce ``llama_tensor_get_type`` and
``tensor_type_fallback`` from ``src/llama-quant.cpp`` of the llama.cpp vendored by
llama-cpp-python 0.3.36 (read from its sdist, not guessed); a test quantizes a real SmolLM2 file
with that llama.cpp and compares every tensor's type and size with these predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgepack.errors import UsageError


@dataclass(frozen=True)
class GgmlType:
    """A ggml tensor type: ``block_size`` values are stored in ``type_size`` bytes."""

    name: str
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


# Block sizes and bytes per block from ggml/src/ggml.c ``type_traits`` (llama.cpp in
# llama-cpp-python 0.3.36): e.g. block_q4_K = 2 fp16 + 12 scale bytes + 128 quant bytes = 144.
GGML_TYPES: dict[str, GgmlType] = {
    t.name: t
    for t in (
        GgmlType("F32", 1, 4),
        GgmlType("F16", 1, 2),
        GgmlType("BF16", 1, 2),
        GgmlType("Q8_0", 32, 34),
        GgmlType("Q6_K", 256, 210),
        GgmlType("Q5_K", 256, 176),
        GgmlType("Q5_1", 32, 24),
        GgmlType("Q5_0", 32, 22),
        GgmlType("Q4_K", 256, 144),
        GgmlType("Q4_1", 32, 20),
        GgmlType("Q4_0", 32, 18),
        GgmlType("Q3_K", 256, 110),
        GgmlType("Q2_K", 256, 84),
    )
}


def tensor_nbytes(type_name: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of ggml type ``type_name``; ``shape`` is ggml order (ne0 = row size)."""
    t = GGML_TYPES[type_name]
    n = 1
    for d in shape:
        n *= int(d)
    return n // t.block_size * t.type_size


@dataclass(frozen=True)
class FileType:
    """A llama.cpp file type (``llama-quantize`` name) with its published quality figure.

    ``kld`` is the mean KL divergence against FP16 on LLaMA 3 8B, Wikitext-2, no imatrix, from
    llama.cpp's ``tools/perplexity/README.md`` ("LLaMA 3 8b Scoreboard", revision f364eb6f;
    Q2_K from the "LLaMA 2 vs. LLaMA 3 Quantization comparison" table of the same file).
    """

    name: str
    default_type: str
    kld: float


# Highest quality first (ascending KL divergence).
FILE_TYPES: tuple[FileType, ...] = (
    FileType("F16", "F16", 0.000551),
    FileType("Q8_0", "Q8_0", 0.001355),
    FileType("Q6_K", "Q6_K", 0.005452),
    FileType("Q5_K_M", "Q5_K", 0.010762),
    FileType("Q5_0", "Q5_0", 0.022239),
    FileType("Q4_K_M", "Q4_K", 0.031273),
    FileType("Q4_0", "Q4_0", 0.071940),
    FileType("Q3_K_M", "Q3_K", 0.101913),
    FileType("Q2_K", "Q2_K", 0.445132),
)
FILE_TYPES_BY_NAME: dict[str, FileType] = {f.name: f for f in FILE_TYPES}


def file_type(name: str) -> FileType:
    """The llama.cpp file type called ``name`` (case-insensitive); raises UsageError if unknown."""
    ft = FILE_TYPES_BY_NAME.get(name.upper().replace("-", "_"))
    if ft is None:
        raise UsageError(
            f"edgepack cannot quantize to {name!r}",
            hint=f"use one of {', '.join(FILE_TYPES_BY_NAME)} (other file types and file "
            "names select a file of a GGUF repo)",
        )
    return ft


@dataclass(frozen=True)
class GgufTensor:
    """A tensor as it appears in an F16 GGUF: GGUF name, ggml shape (ne0 first), source type."""

    name: str
    shape: tuple[int, ...]
    source_type: str


def _quantizable(t: GgufTensor) -> bool:
    # tensor_allows_quantization(): 2-D+ tensors whose name ends in "weight", no norms, no
    # positional embeddings / token types (BERT), no MoE router.
    if len(t.shape) < 2 or not t.name.endswith("weight"):
        return False
    if "_norm.weight" in t.name or "ffn_gate_inp.weight" in t.name:
        return False
    return t.name not in ("position_embd.weight", "token_types.weight")


def _category(name: str) -> str:
    # tensor_get_category(), same precedence.
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (
        ("attn_qkv.weight", "attn_v"),  # category_is_attn_v() treats QKV like V for counting
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if key in name:
            return "attn_qkv" if key == "attn_qkv.weight" else cat
    return "other"


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return (
        i_layer < n_layers // 8
        or i_layer >= 7 * n_layers // 8
        or (i_layer - n_layers // 8) % 3 == 2
    )


def _fallback(shape: tuple[int, ...], target: str) -> str:
    # tensor_type_fallback(): a row size that is not a multiple of the block size demotes the type.
    ncols = shape[0]
    if ncols % GGML_TYPES[target].block_size == 0:
        return target
    ret = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}.get(
        target, target
    )
    return ret if ncols % GGML_TYPES[ret].block_size == 0 else "F16"


def gguf_tensor_types(
    ftype: FileType, tensors: Sequence[GgufTensor], *, n_layer: int, n_gqa: int
) -> dict[str, str]:
    """The ggml type llama.cpp's quantizer gives each tensor for ``ftype`` (no imatrix).

    ``tensors`` are in any order; llama.cpp walks them sorted by layer then name, which matters
    because its layer counters for attn_v / ffn_down advance in that order.
    """
    return gguf_tensor_plan(ftype, tensors, n_layer=n_layer, n_gqa=n_gqa)[0]


def gguf_tensor_plan(
    ftype: FileType, tensors: Sequence[GgufTensor], *, n_layer: int, n_gqa: int
) -> tuple[dict[str, str], int]:
    """Like :func:`gguf_tensor_types`, plus how many tensors needed a fallback type (llama.cpp
    prints "N of M tensor(s) required fallback quantization")."""

    def order(t: GgufTensor) -> tuple[int, str]:
        parts = t.name.split(".")
        layer = int(parts[1]) if parts[0] == "blk" and parts[1].isdigit() else -1
        return (layer, t.name)

    ordered = sorted(tensors, key=order)
    cats = {t.name: _category(t.name) for t in ordered}
    tied = "output" not in cats.values()
    n_attn_v = sum(1 for c in cats.values() if c in ("attn_v", "attn_qkv"))
    i_attn_v = i_ffn_down = n_fallback = 0
    name = ftype.name
    out: dict[str, str] = {}
    for t in ordered:
        if not _quantizable(t):
            out[t.name] = t.source_type
            continue
        new = ftype.default_type
        if new in ("F16", "BF16", "F32"):
            out[t.name] = new  # not a quantized type: no mixture rules, no fallback
            continue
        cat = cats[t.name]
        if cat == "output" or (tied and cat == "token_embd"):
            if t.shape[0] % GGML_TYPES[new].block_size != 0:
                new = "Q8_0"
            elif new != "Q8_0":
                new = "Q6_K"
        elif cat == "token_embd":
            pass
        elif cat in ("attn_v", "attn_qkv"):
            # category_is_attn_v() includes fused QKV, so llama.cpp's later QKV branch is
            # unreachable and these rules apply to it.
            if name == "Q2_K":
                new = "Q4_K" if n_gqa >= 4 else "Q3_K"
            elif name == "Q3_K_M":
                new = "Q5_K" if i_attn_v < 2 else "Q4_K"
            elif name in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i_attn_v, n_attn_v):
                new = "Q6_K"
            i_attn_v += 1
        elif cat == "ffn_down":
            i, n = i_ffn_down, n_layer
            if name == "Q2_K":
                new = "Q3_K"
            elif name == "Q3_K_M":
                new = "Q5_K" if i < n // 16 else "Q4_K"
            elif name in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i, n):
                new = "Q6_K"
            i_ffn_down += 1
        elif cat == "attn_output":
            if name == "Q2_K":
                new = "Q3_K"
            elif name == "Q3_K_M":
                new = "Q4_K"
        out[t.name] = _fallback(t.shape, new)
        n_fallback += out[t.name] != new
    return out, n_fallback


# ---- ONNX -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnnxQuant:
    """An ONNX weight format and its storage cost for 2-D weights.

    ``bytes_per_weight`` covers the stored values; ``group`` / ``scale_bytes`` add one scale per
    group of weights (per output channel when ``group`` is 0). Quality is a rank, best first:
    there is no published KLD table for ONNX Runtime quantization comparable to llama.cpp's.
    """

    name: str
    bytes_per_weight: float
    group: int
    scale_bytes: int
    rank: int


# int8: 8-bit MatMulNBits weights (block 32) and per-channel int8 embedding tables
# (build/onnx_quantize.py); sized here as one byte per weight plus scales.
# int4: MatMulNBitsQuantizer, block_size 32, symmetric (no zero points), fp32 scales;
# it only rewrites MatMul weights, so embeddings stay fp32.
ONNX_QUANTS: tuple[OnnxQuant, ...] = (
    OnnxQuant("fp32", 4.0, 0, 0, 0),
    OnnxQuant("fp16", 2.0, 0, 0, 1),
    OnnxQuant("int8", 1.0, 0, 4, 2),
    OnnxQuant("int4", 0.5, 32, 4, 3),
)
ONNX_QUANTS_BY_NAME: dict[str, OnnxQuant] = {q.name: q for q in ONNX_QUANTS}


def onnx_tensor_nbytes(q: OnnxQuant, shape: Sequence[int], *, is_embedding: bool) -> int:
    """Bytes of one tensor (``shape`` in HF order, rows first) stored with ONNX quant ``q``."""
    n = 1
    for d in shape:
        n *= int(d)
    if len(shape) < 2 or (q.name == "int4" and is_embedding):
        return n * 4  # 1-D parameters and int4-untouched embeddings stay fp32
    if q.name in ("fp32", "fp16"):
        return int(n * q.bytes_per_weight)
    rows = int(shape[0])
    groups = rows if q.group == 0 else -(-n // q.group)
    return int(n * q.bytes_per_weight) + groups * q.scale_bytes


def higher_precision(fmt: str, quant: str) -> tuple[str, ...]:
    """The quantizations of ``fmt`` above ``quant`` in the planner's own tables, next first
    (GGUF: :data:`FILE_TYPES`; ONNX: :data:`ONNX_QUANTS`). The build steps up along these
    when the planner's choice fails validation; each is re-planned with ``quant`` set."""
    names = [f.name for f in FILE_TYPES] if fmt == "gguf" else [q.name for q in ONNX_QUANTS]
    key = quant.upper() if fmt == "gguf" else quant.lower()
    return tuple(reversed(names[: names.index(key)])) if key in names else ()
