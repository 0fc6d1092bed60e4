"""Quantize a GGUF with llama.cpp (through llama-cpp-python's C API) and read back the result.

``llama_model_quantize`` is llama.cpp's own quantizer (what ``llama-quantize`` runs), so the
tensor mix of e.g. Q4_K_M is llama.cpp's: some tensors get a higher type by design (Q6_K for
``output.weight`` and half of ``ffn_down``), and tensors whose row width is not a multiple of
the type's block size **fall back** to another type (e.g. SmolLM2's 576-wide rows are not a
multiple of 256, so Q4_K becomes Q5_0). :class:`QuantResult` records both, read from the output
file's tensor table, so the manifest can say what the file really holds.

The tensor table is read by a small reader here (header only, standard library) rather than the
PyPI ``gguf`` package, which lags llama.cpp's type list and maps the whole file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from edgepack.errors import BuildError
from edgepack.plan.gguf_header import GGML_TYPE_IDS


@dataclass(frozen=True)
class QuantType:
    """A quantization name users pass (``--quant``) and what llama.cpp makes of it."""

    name: str
    ftype: str  # llama_cpp.LLAMA_FTYPE_* attribute
    base: str  # the ggml type most 2-D tensors get
    block: int  # elements per block of ``base``: a row width must be a multiple of it


# Block sizes: ggml/src/ggml-common.h (QK4_0 = QK8_0 = 32, QK_K = 256).
QUANT_TYPES: dict[str, QuantType] = {
    q.name: q
    for q in (
        QuantType("F32", "LLAMA_FTYPE_ALL_F32", "F32", 1),
        QuantType("F16", "LLAMA_FTYPE_MOSTLY_F16", "F16", 1),
        QuantType("BF16", "LLAMA_FTYPE_MOSTLY_BF16", "BF16", 1),
        QuantType("Q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0", "Q8_0", 32),
        QuantType("Q6_K", "LLAMA_FTYPE_MOSTLY_Q6_K", "Q6_K", 256),
        QuantType("Q5_K_M", "LLAMA_FTYPE_MOSTLY_Q5_K_M", "Q5_K", 256),
        QuantType("Q5_K_S", "LLAMA_FTYPE_MOSTLY_Q5_K_S", "Q5_K", 256),
        QuantType("Q5_1", "LLAMA_FTYPE_MOSTLY_Q5_1", "Q5_1", 32),
        QuantType("Q5_0", "LLAMA_FTYPE_MOSTLY_Q5_0", "Q5_0", 32),
        QuantType("Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q4_K", 256),
        QuantType("Q4_K_S", "LLAMA_FTYPE_MOSTLY_Q4_K_S", "Q4_K", 256),
        QuantType("Q4_1", "LLAMA_FTYPE_MOSTLY_Q4_1", "Q4_1", 32),
        QuantType("Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_0", 32),
        QuantType("IQ4_NL", "LLAMA_FTYPE_MOSTLY_IQ4_NL", "IQ4_NL", 32),
        QuantType("Q3_K_L", "LLAMA_FTYPE_MOSTLY_Q3_K_L", "Q3_K", 256),
        QuantType("Q3_K_M", "LLAMA_FTYPE_MOSTLY_Q3_K_M", "Q3_K", 256),
        QuantType("Q3_K_S", "LLAMA_FTYPE_MOSTLY_Q3_K_S", "Q3_K", 256),
        QuantType("Q2_K", "LLAMA_FTYPE_MOSTLY_Q2_K", "Q2_K", 256),
    )
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row width
    type: str


@dataclass(frozen=True)
class QuantResult:
    """What a quantization produced, read back from the output file."""

    path: Path
    quant: str
    size_bytes: int
    tensor_count: int
    type_counts: dict[str, int]  # ggml type name -> number of tensors
    fallbacks: tuple[str, ...]  # tensors whose rows do not fit the requested type's blocks
    fallback_types: dict[str, int] = field(default_factory=dict)  # what those became
    log: str = ""  # llama.cpp's messages during the run

    def as_dict(self) -> dict[str, object]:
        """The manifest's view: file name, quant, size, tensor types and fallbacks (no log)."""
        return {
            "file": self.path.name,
            "quant": self.quant,
            "size_bytes": self.size_bytes,
            "tensor_count": self.tensor_count,
            "tensor_types": dict(self.type_counts),
            "fallbacks": len(self.fallbacks),
            "fallback_types": dict(self.fallback_types),
        }


def quant_type(name: str) -> QuantType:
    """The :class:`QuantType` for a name such as ``q4_k_m``; raises BuildError if unknown."""
    try:
        return QUANT_TYPES[name.upper()]
    except KeyError:
        raise BuildError(
            f"unknown quantization {name!r}",
            hint=f"choose one of {', '.join(QUANT_TYPES)}",
        ) from None


def quantize_gguf(src: Path, dst: Path, quant: str, threads: int | None = None) -> QuantResult:
    """Quantize GGUF ``src`` (f32/f16/bf16) into ``dst`` as ``quant`` with llama.cpp.

    Writes to a temporary file beside ``dst`` and renames it on success. ``threads`` defaults
    to the CPU count. Raises BuildError (exit 5) for an unknown quant name, a missing input, or
    when llama.cpp reports failure; the error carries llama.cpp's own messages. Changes the
    process-wide llama.cpp log callback for the duration of the call.
    """
    import llama_cpp

    qt = quant_type(quant)
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise BuildError(f"cannot quantize {src}: no such file", hint="convert the model first")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = int(threads or os.cpu_count() or 1)
    params.ftype = getattr(llama_cpp, qt.ftype)
    try:
        llama_cpp.llama_backend_init()
        with _captured_llama_output() as captured:
            rc = llama_cpp.llama_model_quantize(
                os.fsencode(src), os.fsencode(tmp), ctypes.byref(params)
            )
        log = captured.text()
        if rc != 0:
            raise BuildError(
                f"llama.cpp could not quantize {src} to {qt.name} (return code {rc}):\n"
                + _last_lines(log),
                hint="check that the input is a complete f16/f32 GGUF (re-run the conversion)",
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; bundle files are world-readable
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    tensors = read_tensor_infos(dst)
    fallbacks = [t for t in tensors if _is_fallback(t, qt)]
    return QuantResult(
        path=dst,
        quant=qt.name,
        size_bytes=dst.stat().st_size,
        tensor_count=len(tensors),
        type_counts=dict(sorted(Counter(t.type for t in tensors).items())),
        fallbacks=tuple(t.name for t in fallbacks),
        fallback_types=dict(sorted(Counter(t.type for t in fallbacks).items())),
        log=log,
    )


def _is_fallback(t: TensorInfo, qt: QuantType) -> bool:
    # 1-D tensors (norms, biases) stay F32 under every quant by design, not as a fallback.
    return len(t.shape) >= 2 and t.shape[0] % qt.block != 0 and t.type != qt.base


def _last_lines(text: str, n: int = 20) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[-n:]) or "(llama.cpp printed nothing)"


# --- capturing llama.cpp's messages -----------------------------------------------------------


class _Captured:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def text(self) -> str:
        return "".join(self.parts)


@contextlib.contextmanager
def _captured_llama_output() -> Iterator[_Captured]:
    """Collect llama.cpp's log messages and anything C code writes to fd 2 during the block.

    llama.cpp reports a failed quantization through its log callback, which llama-cpp-python
    routes to ``sys.stderr`` (where pytest or a CLI may not look), and ggml prints some errors
    with ``fprintf(stderr)``; both are collected here and the default callback is put back.
    """
    import llama_cpp
    from llama_cpp import _logger

    captured = _Captured()

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        captured.parts.append(text.decode("utf-8", errors="replace"))

    with tempfile.TemporaryFile() as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
        try:
            yield captured
        finally:
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
            os.dup2(saved, 2)
            os.close(saved)
            err.seek(0)
            written = err.read().decode("utf-8", errors="replace")
            if written:
                captured.parts.append(written)


# --- reading the tensor table ----------------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY = 8, 9


def read_tensor_infos(path: Path) -> list[TensorInfo]:
    """The tensor table of a GGUF file (v2/v3, little-endian): name, shape, ggml type.

    Reads only the header. Raises BuildError when the file is not a GGUF it understands.
    """
    return _read_header(Path(path))[1]


def read_gguf_metadata(path: Path) -> dict[str, object]:
    """The scalar and string key/values of a GGUF header (arrays such as the vocabulary are
    left out), e.g. ``general.architecture`` or ``tokenizer.chat_template``.

    Raises BuildError when the file is not a GGUF it understands.
    """
    return _read_header(Path(path))[0]


def _read_header(path: Path) -> tuple[dict[str, object], list[TensorInfo]]:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            (version,) = _unpack(f, "<I")
            if magic != b"GGUF" or version not in (2, 3):
                raise BuildError(
                    f"{path} is not a little-endian GGUF v2/v3 file "
                    f"(magic {magic!r}, version {version})"
                )
            n_tensors, n_kv = _unpack(f, "<QQ")
            metadata: dict[str, object] = {}
            for _ in range(n_kv):
                key = _read_string(f)
                (vtype,) = _unpack(f, "<I")
                if vtype in _SCALARS:
                    (metadata[key],) = _unpack(f, _SCALARS[vtype])
                elif vtype == _STRING:
                    metadata[key] = _read_string(f)
                else:
                    _skip_value(f, vtype)
            tensors = []
            for _ in range(n_tensors):
                name = _read_string(f)
                (n_dims,) = _unpack(f, "<I")
                shape = _unpack(f, "<" + "Q" * n_dims)
                (type_id,) = _unpack(f, "<I")
                _unpack(f, "<Q")  # data offset
                type_name = GGML_TYPE_IDS.get(type_id, f"type{type_id}")
                tensors.append(TensorInfo(name, shape, type_name))
            return metadata, tensors
    except (OSError, struct.error, UnicodeDecodeError) as e:
        raise BuildError(f"cannot read the GGUF header of {path}: {e}") from e


def _unpack(f: BinaryIO, fmt: str) -> tuple:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise struct.error(f"file ends inside the header (wanted {size} bytes)")
    return struct.unpack(fmt, data)


def _read_string(f: BinaryIO) -> str:
    (n,) = _unpack(f, "<Q")
    data = f.read(n)
    if len(data) != n:
        raise struct.error("file ends inside a string")
    return data.decode("utf-8")


def _skip_value(f: BinaryIO, vtype: int) -> None:
    if vtype in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[vtype]), os.SEEK_CUR)
    elif vtype == _STRING:
        (n,) = _unpack(f, "<Q")
        f.seek(n, os.SEEK_CUR)
    elif vtype == _ARRAY:
        itype, count = _unpack(f, "<IQ")
        if itype in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[itype]) * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(f, itype)
    else:
        raise struct.error(f"unknown GGUF value type {vtype}")
