"""Quantize an exported ONNX graph with onnxruntime's quantization tools.

Build side: onnx and onnxruntime.quantization are imported inside the functions.

Schemes (the plan picks one per device class):

- ``int8``, encoders: weight-only 8-bit MatMulNBits (block 32, accuracy_level 4: int8
  compute on blocks of 32 activations) for every MatMul weight, and the embedding tables
  (Gather) as dynamic per-channel QInt8. all-MiniLM-L6-v2 against sentence-transformers over
  72 held-out sentences (tests/support/heldout_sentences.py): minimum cosine 0.997, 24.1 MB.
  The previous scheme, dynamic QInt8 with per-channel weights on MatMul and Gather (one uint8
  scale per *tensor* for the activations), scored a mean of 0.988 but a minimum of 0.955
  there (short inputs such as "Well done!" suffer most), at 22.9 MB; leaving the FFN output
  MatMuls in fp32 only raised it to 0.968. For CPUs (Pi, laptops); latency in bench/onnx.py.
- ``int8``, decoder LLMs (graphs with past_key_values): weight-only 8-bit MatMulNBits
  (block 32, accuracy_level 4). Dynamic QInt8 also quantizes activations per tensor: on
  SmolLM2-135M its greedy output matched PyTorch on 1 of 5 prompts (16 tokens each);
  weight-only int8 matched 3 of 5, teacher-forced token agreement 0.975 (0.9875 and 4 of 5
  with fp32 compute, accuracy_level 0, which decodes 10x slower here).
- ``int4``: weight-only, MatMul -> MatMulNBits (block 32, symmetric), for LLMs on CPU.
  Both weight-only schemes store large embedding tables in fp16.
- ``fp16``: float16 weights and compute with fp32 graph inputs/outputs (keep_io_types), for
  Jetson's CUDA execution provider. **Not tested on a GPU here**; the result says so.
- ``fp32``: the graph as exported (copied).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import BuildError, UsageError

SCHEMES = ("fp32", "fp16", "int8", "int4")
WEIGHT_ONLY_BLOCK_SIZE = 32
# protobuf cannot serialise a single message over 2 GB: larger graphs keep weights outside.
_PROTOBUF_LIMIT = 2 * 1024**3 - 1024**2
EXTERNAL_DATA_SUFFIX = "_data"


@dataclass(frozen=True)
class QuantizeResult:
    """What ``quantize_onnx`` wrote: the graph, its external data file (or None), the size of
    both together, and notes for the manifest (e.g. that fp16 was not run on a GPU)."""

    scheme: str
    model_path: Path
    external_data: Path | None
    size_bytes: int
    notes: tuple[str, ...] = ()

    def files(self) -> list[Path]:
        return [self.model_path] + ([self.external_data] if self.external_data else [])


def quantize_onnx(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], scheme: str
) -> QuantizeResult:
    """Quantize the graph at ``src`` (``model.onnx``, external data beside it) into ``dst``.

    ``dst`` is a file path; when the result is over 2 GB its weights go to
    ``<dst>_data`` beside it. The output is written to a temporary name and renamed into place.

    Raises UsageError for an unknown scheme and BuildError when the graph cannot be read or
    quantized (onnxruntime's message is kept).
    """
    if scheme not in SCHEMES:
        raise UsageError(
            f"ONNX quantization {scheme!r} is not supported",
            hint=f"use one of {', '.join(SCHEMES)}",
        )
    src_path, dst_path = Path(src), Path(dst)
    if not src_path.is_file():
        raise BuildError(f"no ONNX graph at {str(src_path)!r}", hint="export the model first")
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dst_path.name}.", dir=dst_path.parent))
    try:
        tmp = tmp_dir / dst_path.name
        try:
            notes = _QUANTIZERS[scheme](src_path, tmp)
        except BuildError:
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime raises many kinds
            raise BuildError(
                f"{scheme} quantization of {str(src_path)!r} failed: {type(e).__name__}: {e}",
                hint="try another --quant, or report the model and this message",
            ) from e
        external = _external_data_file(tmp)
        final_external = None
        if external is not None:
            final_external = dst_path.parent / external.name
            os.replace(external, final_external)
        os.replace(tmp, dst_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    size = dst_path.stat().st_size + (final_external.stat().st_size if final_external else 0)
    return QuantizeResult(scheme, dst_path, final_external, size, notes)


def _int8(src: Path, dst: Path) -> tuple[str, ...]:
    if is_decoder_graph(src):
        return _weight_only(src, dst, bits=8)
    return _int8_encoder(src, dst)


def _int8_encoder(src: Path, dst: Path) -> tuple[str, ...]:
    """MatMul weights as 8-bit MatMulNBits, then the embedding tables as dynamic QInt8."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    count = rewrite_matmul_nbits(model, bits=8, block_size=WEIGHT_ONLY_BLOCK_SIZE,
                                 accuracy_level=4)
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=dst.parent) as tmp:
        mid = Path(tmp) / "matmul-nbits.onnx"
        _save(model, mid)
        del model
        quantize_dynamic(
            str(mid),
            str(dst),
            # Only the tables remain: the MatMuls are MatMulNBits now.
            op_types_to_quantize=["Gather"],
            per_channel=True,
            reduce_range=False,
            weight_type=QuantType.QInt8,
            use_external_data_format=_needs_external_data(src),
        )
    return (
        f"weight-only int8 (MatMulNBits, block {WEIGHT_ONLY_BLOCK_SIZE}, symmetric, "
        f"accuracy_level 4) on {count} MatMul weights",
        "embedding tables: dynamic QInt8, per-channel",
    )


def _int4(src: Path, dst: Path) -> tuple[str, ...]:
    return _weight_only(src, dst, bits=4)


def _weight_only(src: Path, dst: Path, *, bits: int) -> tuple[str, ...]:
    """int8 is the quality option: transformer-block weights only, the tied embedding / LM
    head stay fp32 (a tiny random Llama's greedy output then matches PyTorch on all test
    prompts; with an int8 head it did not on 1 of 5). int4 is the size option: the head is
    quantized too and the embedding table stored in fp16."""
    import onnx

    model = onnx.load(str(src))
    notes = []
    if bits == 4:
        fold_weight_transposes(model)
    # 8-bit MatMulNBits with accuracy_level 0 (fp32 compute) takes a slow path in onnxruntime
    # 1.32's CPU kernels: SmolLM2-135M decoded at 1.0 tok/s vs 10 tok/s with level 4 (int8
    # compute on blocks of 32 activations) on this machine. int4's fp32 path is fast.
    level = 4 if bits == 8 else 0
    count = rewrite_matmul_nbits(model, bits=bits, block_size=WEIGHT_ONLY_BLOCK_SIZE,
                                 accuracy_level=level)
    notes.append(
        f"weight-only int{bits} (MatMulNBits, block {WEIGHT_ONLY_BLOCK_SIZE}, symmetric) on "
        f"{count} MatMul weights; accuracy_level {level}"
    )
    if bits == 4:
        tables = halve_gather_tables(model)
        notes.append(f"{tables} embedding table(s) stored fp16, gathered rows cast to fp32")
    else:
        notes.append("tied embedding / LM head kept fp32")
    _save(model, dst)
    return tuple(notes)


def is_decoder_graph(path: Path) -> bool:
    """Whether the graph is an optimum decoder with a KV cache (past_key_values inputs)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(i.name.startswith("past_key_values") for i in model.graph.input)


def rewrite_matmul_nbits(
    model: Any, *, bits: int = 4, block_size: int = WEIGHT_ONLY_BLOCK_SIZE,
    accuracy_level: int = 0, symmetric: bool = True,
) -> int:
    """Replace each MatMul with a constant 2-D weight by a ``com.microsoft.MatMulNBits``.

    Same packing as onnxruntime's ``MatMulNBitsQuantizer`` (its C++ ``quantize_matmul_4bits``
    / ``quantize_matmul_8bits`` kernels, symmetric, blocks along K), without that module's
    import of ``onnx_ir``, which onnxruntime 1.32 requires but does not install. Returns how
    many MatMuls were rewritten. Subgraphs (If/Loop bodies) are left as they are.
    """
    import numpy as np
    from onnx import helper, numpy_helper
    from onnxruntime.capi import _pybind_state as kernels

    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    pack = kernels.quantize_matmul_4bits if bits == 4 else kernels.quantize_matmul_8bits
    per_byte = 8 // bits
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    new_nodes, new_inits, count = [], [], 0
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2:
            new_nodes.append(node)
            continue
        b = numpy_helper.to_array(weight).astype(np.float32)
        k, n = b.shape
        k_blocks = (k + block_size - 1) // block_size
        if k_blocks * block_size != k:
            b = np.pad(b, ((0, k_blocks * block_size - k), (0, 0)))
        packed = np.zeros((n, k_blocks, block_size // per_byte), dtype=np.uint8)
        scales = np.zeros((n, k_blocks), dtype=np.float32)
        zero_points = np.zeros((n, (k_blocks + per_byte - 1) // per_byte), dtype=np.uint8)
        pack(packed, np.ascontiguousarray(b), scales, zero_points, block_size, n, k, symmetric)
        q_name, s_name = f"{weight.name}_Q{bits}", f"{weight.name}_scales"
        new_inits += [numpy_helper.from_array(packed, q_name),
                      numpy_helper.from_array(scales, s_name)]
        inputs = [node.input[0], q_name, s_name]
        if not symmetric:
            new_inits.append(numpy_helper.from_array(zero_points, f"{weight.name}_zero_points"))
            inputs.append(f"{weight.name}_zero_points")
        new_nodes.append(
            helper.make_node(
                "MatMulNBits",
                inputs,
                list(node.output),
                name=(node.name or weight.name) + f"_Q{bits}",
                domain="com.microsoft",
                K=k, N=n, bits=bits, block_size=block_size, accuracy_level=accuracy_level,
            )
        )
        count += 1
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    _drop_unused_initializers(graph)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return count


def fold_weight_transposes(model: Any) -> int:
    """Turn ``Transpose(initializer)`` into a transposed initializer; returns how many.

    optimum stores tied embeddings once and feeds the LM head ``Transpose(embed_tokens)``, so
    the head's MatMul has no constant weight and would stay fp32 (a vocab x hidden matrix,
    the largest in a small LLM). Folding gives the head its own constant to quantize, and the
    embedding table is then read by Gather alone.
    """
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    keep, count = [], 0
    for node in graph.node:
        weight = inits.get(node.input[0]) if node.op_type == "Transpose" else None
        if weight is None:
            keep.append(node)
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        value = np.transpose(numpy_helper.to_array(weight), perm)
        graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        count += 1
    graph.ClearField("node")
    graph.node.extend(keep)
    _drop_unused_initializers(graph)
    return count


def halve_gather_tables(model: Any, *, min_elements: int = 1 << 20) -> int:
    """Store large fp32 tables read only by Gather (token embeddings) as fp16 + a Cast.

    A weight-only graph otherwise keeps the embedding table in fp32: for SmolLM2-135M that is
    113 MB of a 180 MB int4 graph. fp16 holds the rows to about 3 significant digits, which
    the first RMSNorm/LayerNorm sees; returns how many tables were converted.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    count = 0
    for init in list(graph.initializer):
        users = readers.get(init.name, [])
        if (
            init.data_type != TensorProto.FLOAT
            or int(np.prod(init.dims)) < min_elements
            or not users
            or any(u.op_type != "Gather" or u.input[0] != init.name for u in users)
        ):
            continue
        half = numpy_helper.from_array(
            numpy_helper.to_array(init).astype(np.float16), init.name + "_fp16"
        )
        graph.initializer.remove(init)
        graph.initializer.append(half)
        nodes = list(graph.node)
        for user in users:
            out = user.output[0]
            user.input[0] = half.name
            user.output[0] = out + "_fp16"
            cast = helper.make_node("Cast", [out + "_fp16"], [out], to=TensorProto.FLOAT,
                                    name=(user.name or out) + "_to_fp32")
            nodes.insert(nodes.index(user) + 1, cast)
        graph.ClearField("node")
        graph.node.extend(nodes)
        count += 1
    return count


def _drop_unused_initializers(graph: Any) -> None:
    used = {name for node in graph.node for name in node.input}
    used |= {o.name for o in graph.output}
    for node in graph.node:  # names read inside subgraphs
        for attr in node.attribute:
            for g in [attr.g] + list(attr.graphs):
                used |= {name for n in g.node for name in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(keep)


def _fp16(src: Path, dst: Path) -> tuple[str, ...]:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    model = convert_float_to_float16(model, keep_io_types=True)
    _save(model, dst)
    return (
        "fp16 weights and compute, fp32 inputs/outputs (for the CUDA execution provider)",
        "untested on a GPU: built and checked on the CPU execution provider only",
    )


def _fp32(src: Path, dst: Path) -> tuple[str, ...]:
    import onnx

    if _external_data_file(src) is None:
        shutil.copyfile(src, dst)
    else:
        # Re-save so the external data file is named after dst.
        _save(onnx.load(str(src)), dst)
    return ("as exported",)


_QUANTIZERS = {"int8": _int8, "int4": _int4, "fp16": _fp16, "fp32": _fp32}


def _save(model: object, dst: Path) -> None:
    import onnx

    big = model.ByteSize() > _PROTOBUF_LIMIT  # type: ignore[attr-defined]
    if big:
        onnx.save_model(
            model,  # type: ignore[arg-type]
            str(dst),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=dst.name + EXTERNAL_DATA_SUFFIX,
        )
    else:
        onnx.save_model(model, str(dst))  # type: ignore[arg-type]


def _needs_external_data(src: Path) -> bool:
    ext = _external_data_file(src)
    total = src.stat().st_size + (ext.stat().st_size if ext else 0)
    return total > _PROTOBUF_LIMIT


def _external_data_file(model_path: Path) -> Path | None:
    """The single external data file a graph refers to, if any (read from the graph)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    model = onnx.load(str(model_path), load_external_data=False)
    locations = set()
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    if not locations:
        return None
    if len(locations) > 1:
        raise BuildError(
            f"{model_path} keeps weights in {len(locations)} external files: {sorted(locations)}",
            hint="edgepack packages one external data file per graph; re-export the model",
        )
    return model_path.parent / locations.pop()
