"""Rebuild a SentencePiece ``tokenizer.model`` from a SentencePiece-style ``tokenizer.json``.

transformers 5 saves SentencePiece tokenizers (Gemma, Llama-2, Mistral v0.3, Phi-3) as
tokenizer.json alone. llama.cpp's converter reads ``tokenizer.model`` for those families (Gemma 1/2
and SentencePiece Phi-3 refuse without it; Llama/Mistral fall through to the GPT-2 BPE path,
whose pre-tokenizer check does not know a SentencePiece vocabulary). The vocabulary is all in
tokenizer.json, in the form ``tokenizers`` converted it to (see ``SpmConverter`` in
transformers' ``convert_slow_tokenizer.py``), so the model file can be written back:

- BPE (``byte_fallback``): SentencePiece merges the adjacent pair whose merged piece has the
  highest score; tokenizers lists the same merges in priority order. A merged piece's score is
  minus its merge's rank (what ``spm_train --model_type=bpe`` itself writes: ``▁a`` 0, ``is``
  -1, ...). Pieces no merge makes (single characters, bytes, specials) keep score 0.
- Unigram: the scores are in tokenizer.json as they were.
- Piece types: ``<0xNN>`` byte pieces BYTE, the unknown token UNKNOWN, special added tokens
  CONTROL, other added tokens USER_DEFINED.
- Normalizer: identity with whitespace escaping; ``add_dummy_prefix`` from a ``Metaspace``
  pre-tokenizer's prepend scheme or a ``Prepend("▁")`` normalizer.

tests/test_checkpoint_compat.py checks the result where it matters: llama.cpp tokenizes text
from a GGUF made with the rebuilt model exactly as ``tokenizers`` does with tokenizer.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from edgepack.errors import BuildError

_SPACE = "\u2581"
_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# sentencepiece_model.proto: ModelProto.SentencePiece.Type and TrainerSpec.ModelType
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE_TYPE = 1, 2, 3, 4, 6
_UNIGRAM, _BPE = 1, 2


def needs_spm_model(folder: Path) -> bool:
    """True when ``folder`` has a SentencePiece-style tokenizer.json but no tokenizer.model."""
    folder = Path(folder)
    if (folder / "tokenizer.model").exists() or not (folder / "tokenizer.json").is_file():
        return False
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False  # the converter reports an unreadable tokenizer itself
    return _is_sentencepiece(data)


def _is_sentencepiece(data: dict[str, Any]) -> bool:
    model = data.get("model") or {}
    if model.get("type") == "Unigram":
        return True
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False
    # A byte-level BPE (GPT-2 style) has no byte-fallback pieces and no "▁" word marker.
    text = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")], ensure_ascii=False)
    return "Metaspace" in text or _SPACE in text


def spm_model_bytes(folder: Path) -> tuple[bytes, list[str]]:
    """The serialized ModelProto for ``folder/tokenizer.json`` and the note for the manifest.

    Raises BuildError when tokenizer.json is not SentencePiece-style or protobuf is missing.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # protobuf is missing
        raise BuildError(
            f"cannot write tokenizer.model for {folder}: {e}",
            hint="pip install 'edgepack[build]' (it brings sentencepiece and protobuf)",
        ) from e
    data = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
    if not _is_sentencepiece(data):
        raise BuildError(f"{folder}/tokenizer.json is not a SentencePiece-style tokenizer")
    model = data["model"]
    pieces, scores = _pieces_and_scores(model)
    added = {int(t["id"]): t for t in data.get("added_tokens") or []}
    for tid, tok in added.items():
        pieces.setdefault(tid, tok["content"])
        scores.setdefault(tid, 0.0)
    size = max(pieces) + 1
    missing = [i for i in range(size) if i not in pieces]
    if missing:
        raise BuildError(
            f"{folder}/tokenizer.json leaves token ids {missing[:5]} without a piece",
            hint="the tokenizer is damaged; re-save it with transformers",
        )
    unk = model.get("unk_token") or _first(added, "<unk>")
    proto = pb.ModelProto()  # type: ignore[attr-defined]  # generated protobuf code
    for i in range(size):
        piece = proto.pieces.add()
        piece.piece = pieces[i]
        piece.score = scores[i]
        piece.type = _piece_type(pieces[i], added.get(i), unk, bool(model.get("byte_fallback")))
    spec = proto.trainer_spec
    spec.model_type = _UNIGRAM if model["type"] == "Unigram" else _BPE
    spec.vocab_size = size
    spec.byte_fallback = bool(model.get("byte_fallback"))
    ids = {p: i for i, p in pieces.items()}
    spec.unk_id = ids.get(unk, 0) if unk else 0
    spec.bos_id = ids.get("<s>", ids.get("<bos>", -1))
    spec.eos_id = ids.get("</s>", ids.get("<eos>", -1))
    spec.pad_id = ids.get("<pad>", -1)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = _adds_dummy_prefix(data)
    norm.escape_whitespaces = True
    norm.remove_extra_whitespaces = False
    note = (
        f"tokenizer.model: rebuilt from tokenizer.json ({model['type']}, {size} pieces) "
        "for llama.cpp's SentencePiece vocabulary reader"
    )
    return proto.SerializeToString(), [note]


def _pieces_and_scores(model: dict[str, Any]) -> tuple[dict[int, str], dict[int, float]]:
    if model["type"] == "Unigram":
        scored = model["vocab"]
        return ({i: str(p) for i, (p, _) in enumerate(scored)},
                {i: float(s) for i, (_, s) in enumerate(scored)})
    vocab: dict[str, int] = model["vocab"]
    pieces = {int(i): p for p, i in vocab.items()}
    rank: dict[str, int] = {}
    for n, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, n)
    scores = {i: -float(rank[p]) if p in rank else 0.0 for i, p in pieces.items()}
    return pieces, scores


def _piece_type(piece: str, added: dict[str, Any] | None, unk: str | None, fallback: bool) -> int:
    if unk is not None and piece == unk:
        return _UNKNOWN
    if added is not None:
        return _CONTROL if added.get("special") else _USER_DEFINED
    if fallback and _BYTE.fullmatch(piece):
        return _BYTE_TYPE
    return _NORMAL


def _adds_dummy_prefix(data: dict[str, Any]) -> bool:
    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            kind = node.get("type")
            if kind == "Metaspace":
                legacy = "always" if node.get("add_prefix_space") else "never"
                scheme = node.get("prepend_scheme", legacy)
                return scheme in ("first", "always")
            if kind == "Prepend" and node.get("prepend") == _SPACE:
                return True
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(data.get("normalizer")) or walk(data.get("pre_tokenizer"))


def _first(added: dict[int, dict[str, Any]], content: str) -> str | None:
    return content if any(t["content"] == content for t in added.values()) else None
