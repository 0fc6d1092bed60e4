"""GGUF headers read from bytes, and the model facts they hold. Pure: no files, no network.

The hub client (:mod:`edgepack.build.gguf_repo`) fetches a file's first bytes with HTTP Range
requests and hands them to :func:`parse_gguf_header`; when the buffer ends inside the header
the parser raises :class:`HeaderIncomplete` with how many bytes it needs at least, so the caller
can read more, up to its own byte limit. Layout per llama.cpp's ``docs/../gguf.md`` (GGUF v2/v3,
little-endian): magic, version, tensor count, key/value count, key/values, tensor infos.

Only scalars and strings are kept from the key/values (e.g. ``tokenizer.chat_template``);
arrays (the vocabulary, merges) are skipped and only their length is kept, as
``<key>.__len__``.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgepack.errors import BuildError
from edgepack.plan.facts import SUPPORTED_TYPES, ModelFacts, ModelSizes, TensorFact
from edgepack.plan.quants import FILE_TYPES_BY_NAME, GGML_TYPES

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY = 8, 9
# Guards against a corrupt count making the parser loop for ever: real files hold a few
# hundred keys and a few thousand tensors.
_MAX_ITEMS = 1_000_000

# enum ggml_type (ggml/include/ggml.h); the numbers are part of the file format.
GGML_TYPE_IDS: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip
# (block size, bytes per block) of the types GGML_TYPES (quants.py) lacks, from ggml.c
# type_traits, so that an exotic tensor still gets its exact size (a test compares them with
# the gguf package's GGML_QUANT_SIZES). Q8_1 is left out: an activation type of the dot
# products that files never store.
_EXTRA_SIZES: dict[str, tuple[int, int]] = {
    "Q8_K": (256, 292), "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74),
    "IQ3_XXS": (256, 98), "IQ1_S": (256, 50), "IQ4_NL": (32, 18), "IQ3_S": (256, 110),
    "IQ2_S": (256, 82), "IQ4_XS": (256, 136), "I8": (1, 1), "I16": (1, 2), "I32": (1, 4),
    "I64": (1, 8), "F64": (1, 8), "IQ1_M": (256, 56), "TQ1_0": (256, 54), "TQ2_0": (256, 66),
    "MXFP4": (32, 17),
}  # fmt: skip
# enum llama_ftype (include/llama.h): what ``general.file_type`` says the file is.
LLAMA_FTYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE",
}  # fmt: skip
# GGUF general.architecture -> config.json model_type, for the architectures edgepack plans.
_ARCH_TO_MODEL_TYPE = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
    "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3",
    "bert": "bert", "nomic-bert": "nomic_bert",
}  # fmt: skip
_SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
_QUANT_IN_NAME = re.compile(
    r"(?<![A-Za-z0-9])(I?Q\d_[A-Z0-9_]+?|Q\d_\d|BF16|F16|F32|FP16)(?=[.-]|$)", re.IGNORECASE
)


class HeaderIncomplete(Exception):  # noqa: N818 - a signal to read more, not an error
    """The buffer ends inside the header; ``need`` is a lower bound of the bytes required."""

    def __init__(self, need: int) -> None:
        super().__init__(f"need at least {need} bytes")
        self.need = need


@dataclass(frozen=True)
class GgufTensorInfo:
    """One tensor of a GGUF file: name, ggml shape (ne0 = row width first), ggml type."""

    name: str
    shape: tuple[int, ...]
    type: str

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        if self.type in GGML_TYPES:
            t = GGML_TYPES[self.type]
            return n // t.block_size * t.type_size
        block, size = _EXTRA_SIZES.get(self.type, (1, 0))
        return n // block * size


@dataclass(frozen=True)
class GgufHeader:
    """The parsed header: key/values (scalars, strings, array lengths) and tensor infos."""

    version: int
    metadata: Mapping[str, Any]
    tensors: tuple[GgufTensorInfo, ...]
    header_bytes: int  # where the header (without alignment padding) ends

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def weights_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


class _Cursor:
    def __init__(self, buf: bytes) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> tuple[Any, ...]:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise HeaderIncomplete(self.pos + size)
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return out

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise HeaderIncomplete(self.pos + n)
        self.pos += n

    def string(self) -> str:
        (n,) = self.take("<Q")
        if n > len(self.buf) + (1 << 32):
            raise ValueError(f"string length {n} is not plausible")
        start = self.pos
        self.skip(n)
        return self.buf[start : self.pos].decode("utf-8", errors="replace")


def _count(n: int, what: str) -> int:
    if n > _MAX_ITEMS:
        raise ValueError(f"{what} count {n} is not plausible")
    return n


def _skip_array(c: _Cursor, itype: int, count: int) -> None:
    if itype in _SCALARS:
        c.skip(struct.calcsize(_SCALARS[itype]) * count)
    elif itype == _STRING:
        for _ in range(count):
            (n,) = c.take("<Q")
            c.skip(n)
    elif itype == _ARRAY:
        for _ in range(count):
            sub, n = c.take("<IQ")
            _skip_array(c, sub, _count(n, "nested array"))
    else:
        raise ValueError(f"unknown GGUF value type {itype}")


def parse_gguf_header(buf: bytes, name: str = "file") -> GgufHeader:
    """Parse the GGUF header at the start of ``buf``.

    Raises HeaderIncomplete when ``buf`` ends inside the header, BuildError when the bytes are
    not a GGUF v2/v3 header (``name`` is used in the message).
    """
    c = _Cursor(buf)
    try:
        (magic,) = c.take("<4s")
        (version,) = c.take("<I")
        if magic != b"GGUF" or version not in (2, 3):
            raise BuildError(
                f"{name} is not a little-endian GGUF v2/v3 file (magic {magic!r}, "
                f"version {version})",
                hint="the repo's .gguf file is damaged or in an unsupported format",
            )
        n_tensors, n_kv = c.take("<QQ")
        metadata: dict[str, Any] = {}
        for _ in range(_count(n_kv, "key/value")):
            key = c.string()
            (vtype,) = c.take("<I")
            if vtype in _SCALARS:
                (metadata[key],) = c.take(_SCALARS[vtype])
            elif vtype == _STRING:
                metadata[key] = c.string()
            elif vtype == _ARRAY:
                itype, count = c.take("<IQ")
                _skip_array(c, itype, _count(count, f"array {key}"))
                metadata[f"{key}.__len__"] = count
            else:
                raise ValueError(f"unknown GGUF value type {vtype} for key {key!r}")
        tensors = []
        for _ in range(_count(n_tensors, "tensor")):
            tname = c.string()
            (n_dims,) = c.take("<I")
            if n_dims > 8:
                raise ValueError(f"tensor {tname!r} has {n_dims} dimensions")
            shape = tuple(int(d) for d in c.take("<" + "Q" * n_dims))
            (type_id,) = c.take("<I")
            c.take("<Q")  # data offset
            type_name = GGML_TYPE_IDS.get(type_id, f"type{type_id}")
            tensors.append(GgufTensorInfo(tname, shape, type_name))
    except (ValueError, struct.error) as e:
        raise BuildError(
            f"the GGUF header of {name} is malformed: {e}",
            hint="the repo's .gguf file is damaged; pick another file or repo",
        ) from e
    return GgufHeader(int(version), metadata, tuple(tensors), c.pos)


# -- file names -----------------------------------------------------------------------------
def split_parts(path: str) -> tuple[str, int, int] | None:
    """``(stem, index, count)`` of a split GGUF name such as ``m-Q4_0-00001-of-00003.gguf``
    (llama.cpp's ``llama_split_path`` format), or None for a single file."""
    m = _SPLIT_RE.match(path)
    if m is None:
        return None
    return m.group("stem"), int(m.group("i")), int(m.group("n"))


def quant_label(filename: str, header: GgufHeader | None = None) -> str:
    """The file's quantization name: ``general.file_type`` when the header has it, else the
    name's quant suffix (``...-Q4_K_M.gguf``), else ``unknown``."""
    if header is not None:
        ftype = header.metadata.get("general.file_type")
        if isinstance(ftype, int) and ftype in LLAMA_FTYPES:
            return LLAMA_FTYPES[ftype]
    base = filename.rsplit("/", 1)[-1]
    parts = split_parts(base)
    stem = parts[0] if parts else base.removesuffix(".gguf")
    found = _QUANT_IN_NAME.findall(stem + ".")
    if found:
        label = found[-1].upper()
        return "F16" if label == "FP16" else label
    return "unknown"


def quality_kld(label: str, bits_per_weight: float) -> tuple[float, str]:
    """(KL divergence to rank by, its basis). Known llama.cpp file types take their published
    figure (quants.FILE_TYPES); others take the figure of the known type whose nominal bits per
    weight is nearest to this file's, which ranks e.g. IQ4_XS next to Q4_K_M."""
    if label in FILE_TYPES_BY_NAME:
        return FILE_TYPES_BY_NAME[label].kld, "llama.cpp scoreboard"
    if label in ("F32", "BF16"):
        return FILE_TYPES_BY_NAME["F16"].kld, "as F16"
    nearest = min(
        FILE_TYPES_BY_NAME.values(),
        key=lambda ft: abs(GGML_TYPES[ft.default_type].bits_per_weight - bits_per_weight),
    )
    return nearest.kld, f"nearest by bits per weight: {nearest.name}"


# -- facts ----------------------------------------------------------------------------------
def gguf_model_facts(header: GgufHeader, tensors: Sequence[GgufTensorInfo] | None = None,
                     name: str = "file") -> ModelFacts:
    """Model facts from a GGUF header (``tensors``: all splits' tensors, default the header's).

    Each TensorFact keeps its GGUF name and its stored ggml type as ``dtype``. Raises
    BuildError for an architecture edgepack does not plan for or a header lacking sizes.
    """
    md = header.metadata
    arch = header.architecture
    model_type = _ARCH_TO_MODEL_TYPE.get(arch)
    if model_type is None or model_type not in SUPPORTED_TYPES:
        raise BuildError(
            f"{name} holds a {arch or 'unnamed'!r} model; edgepack plans for GGUF "
            f"architectures {', '.join(sorted(_ARCH_TO_MODEL_TYPE))}",
            hint="pick a repo of a supported architecture",
        )

    def key(k: str, default: Any = None) -> Any:
        return md.get(f"{arch}.{k}", default)

    try:
        hidden = int(key("embedding_length"))
        n_layer = int(key("block_count"))
        n_head = int(key("attention.head_count"))
    except (TypeError, ValueError) as e:
        raise BuildError(
            f"{name} lacks {arch}.embedding_length / block_count / attention.head_count",
            hint="the GGUF was written by an old or unusual converter; pick another file",
        ) from e
    sizes = ModelSizes(
        n_layer=n_layer,
        hidden_size=hidden,
        n_head=n_head,
        n_kv_head=int(key("attention.head_count_kv", n_head) or n_head),
        head_dim=int(key("attention.key_length", 0) or hidden // max(1, n_head)),
        ffn_size=int(key("feed_forward_length", 4 * hidden) or 4 * hidden),
        # 0: the token embedding's rows (ModelFacts.from_sizes)
        vocab_size=int(key("vocab_size", 0) or md.get("tokenizer.ggml.tokens.__len__", 0)),
        max_context=int(key("context_length", 2048) or 2048),
    )
    infos = tuple(tensors if tensors is not None else header.tensors)
    facts = tuple(
        TensorFact(t.name, tuple(reversed(t.shape)), t.type, t.name, t.shape)
        for t in sorted(infos, key=lambda t: t.name)
    )
    family = "encoder" if model_type in ("bert", "nomic_bert") else "decoder"
    tied = family == "decoder" and not any(t.name == "output.weight" for t in infos)
    return ModelFacts.from_sizes(sizes, facts, architecture=str(md.get("general.name") or arch),
                                 model_type=model_type, family=family, tied_embeddings=tied)
