"""Checkpoints written by transformers 5 build with the build's transformers 4, through a
working copy (edgepack.build.checkpoint_compat), on real files each generation wrote."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from edgepack.build.checkpoint_compat import (
    NOTE_FILE,
    config_for_transformers4,
    make_working_copy,
    tokenizer_config_for_transformers4,
)
from edgepack.build.spm_rebuild import needs_spm_model

pytestmark = pytest.mark.slow
TEXTS = (
    "the capital of France is Paris",
    "Zürich 東京 123456 code: def f(x): return x**2",
    "what is how many, hello world!",
    "<|im_start|>user\nhello<|im_end|>",
)


def _tf(generation: int) -> Path:
    from support.families import Transformers5Unavailable, family_checkpoints

    try:
        return family_checkpoints(generation)
    except Transformers5Unavailable as e:  # no package index: transformers 5 cannot be had
        pytest.skip(f"transformers 5 cannot be installed here: {e}")


@pytest.fixture(scope="module")
def tf4() -> Path:
    return _tf(4)


@pytest.fixture(scope="module")
def tf5() -> Path:
    return _tf(5)


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_transformers5_files_are_what_the_issue_describes(tf5):
    llama_tok = json.loads((tf5 / "llama" / "tokenizer_config.json").read_text())
    assert llama_tok["tokenizer_class"] == "TokenizersBackend"
    assert isinstance(llama_tok["extra_special_tokens"], list)
    assert "rope_parameters" in json.loads((tf5 / "llama" / "config.json").read_text())
    for family in ("gemma", "phi3", "mistral"):  # SentencePiece saved without tokenizer.model
        assert not (tf5 / family / "tokenizer.model").exists()
        assert needs_spm_model(tf5 / family)
    assert (tf5 / "llama" / "chat_template.jinja").is_file()


def test_transformers4_reads_the_working_copy_and_not_the_original(tf5, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    src = tf5 / "llama"
    before = _digests(src)
    with pytest.raises(Exception, match="keys|TokenizersBackend"):
        AutoTokenizer.from_pretrained(src)
    # Read as is, transformers 4 silently falls back to its default rope_theta.
    assert AutoConfig.from_pretrained(src).rope_theta == 10000.0

    work = make_working_copy(src, tmp_path, "sha-llama")
    assert work.folder != src and (work.folder / NOTE_FILE).is_file()
    assert any("TokenizersBackend" in c for c in work.changes)
    assert AutoConfig.from_pretrained(work.folder).rope_theta == 50000.0
    tok = AutoTokenizer.from_pretrained(work.folder)
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(src / "tokenizer.json"))
    for text in TEXTS:
        assert tok(text, add_special_tokens=False)["input_ids"] == raw.encode(
            text, add_special_tokens=False).ids
    assert "<|im_start|>" in tok.additional_special_tokens
    assert _digests(src) == before  # the user's files are untouched
    # Large files are hard links, not copies; a second call reuses the copy.
    assert (work.folder / "model.safetensors").stat().st_ino == (
        src / "model.safetensors").stat().st_ino
    again = make_working_copy(src, tmp_path, "sha-llama")
    assert again == work


def test_transformers4_checkpoints_are_used_where_they_lie(tf4, tmp_path):
    for family in ("llama", "gemma", "bert"):
        work = make_working_copy(tf4 / family, tmp_path, family)
        assert work.folder == tf4 / family and work.changes == ()
    assert not (tmp_path / "working").exists()


def test_rope_rewrites_are_pure_and_cover_per_layer_types():
    cfg = {"rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                               "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}}
    out, notes = config_for_transformers4(cfg)
    assert out["rope_theta"] == 1e6 and out["rope_local_base_freq"] == 1e4 and len(notes) == 2
    assert "rope_theta" not in cfg  # the input is not modified
    yarn = {"rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0}}
    out, _ = config_for_transformers4(yarn)
    assert out["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "type": "yarn"}
    assert config_for_transformers4({"rope_theta": 5.0}) == ({"rope_theta": 5.0}, [])
    tok, notes = tokenizer_config_for_transformers4(
        {"tokenizer_class": "TokenizersBackend", "extra_special_tokens": ["<a>"],
         "additional_special_tokens": ["<b>"]})
    assert tok == {"tokenizer_class": "PreTrainedTokenizerFast",
                   "additional_special_tokens": ["<b>", "<a>"]}
    assert len(notes) == 2


@pytest.mark.parametrize("family", ["gemma", "phi3"])
def test_rebuilt_sentencepiece_model_tokenizes_like_the_original(family, tf4, tf5, tmp_path):
    """llama.cpp reads the rebuilt tokenizer.model (transformers 5 files) into a vocabulary
    that tokenizes exactly like the original tokenizer.model (transformers 4 files)."""
    from llama_cpp import Llama
    from support.families import FAMILIES_VERSION
    from support.models import build_gguf

    work = make_working_copy(tf5 / family, tmp_path, f"tf5-{family}")
    assert (work.folder / "tokenizer.model").is_file()
    assert not (tf5 / family / "tokenizer.model").exists()
    new = build_gguf(work.folder, "f32", key=f"families{FAMILIES_VERSION}-tf5-{family}")
    old = build_gguf(tf4 / family, "f32", key=f"families{FAMILIES_VERSION}-tf4-{family}")
    a = Llama(str(new), vocab_only=True, verbose=False)
    b = Llama(str(old), vocab_only=True, verbose=False)
    # Text pieces, not special-token ids: transformers 4's GemmaTokenizer renumbers the
    # specials of this non-Gemma SentencePiece model (pad/eos/bos to 0/1/2), 5 keeps them.
    for text in TEXTS + ("  two  spaces and\ttabs\nnewline",):
        assert a.tokenize(text.encode(), add_bos=False, special=False) == b.tokenize(
            text.encode(), add_bos=False, special=False), text
    bos = json.loads((tf5 / family / "tokenizer_config.json").read_text())["bos_token"]
    assert a.detokenize([a.token_bos()], special=True).decode() == bos
