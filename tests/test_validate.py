"""edgepack.build.gguf_validate: real llama.cpp inference on quantized files against their
intermediates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgepack.build.gguf_quantize import quantize_gguf
from edgepack.build.gguf_validate import (
    DEFAULT_GOLDEN,
    EMBEDDING_TEXTS,
    REFERENCE_TEXT,
    THRESHOLDS,
    GoldenPrompt,
    cosine_rows,
    embed_texts,
    is_embedding_model,
    threshold_for,
    validate_gguf,
)
from edgepack.errors import BuildError


@pytest.fixture(scope="module")
def smollm2_quants(smollm2_f16_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("smollm2-quants")
    return {
        q: quantize_gguf(smollm2_f16_gguf, out / f"{q}.gguf", q, threads=2).path
        for q in ("Q8_0", "Q4_0")
    }


def test_every_quant_has_a_threshold() -> None:
    from edgepack.build.gguf_quantize import QUANT_TYPES

    assert set(THRESHOLDS) == set(QUANT_TYPES)
    # Coarser quants never demand more than finer ones.
    order = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]
    for finer, coarser in zip(order, order[1:], strict=False):
        a, b = THRESHOLDS[finer], THRESHOLDS[coarser]
        assert b.min_agreement <= a.min_agreement and b.max_kl >= a.max_kl, (finer, coarser)
        assert b.min_cosine <= a.min_cosine, (finer, coarser)
    with pytest.raises(BuildError, match="unknown quantization"):
        threshold_for("Q9_9")


def test_reference_text_is_about_200_tokens(tiny_llama_f32_gguf: Path) -> None:
    from llama_cpp import Llama

    llm = Llama(str(tiny_llama_f32_gguf), vocab_only=True, verbose=False)
    try:
        n = len(llm.tokenize(REFERENCE_TEXT.encode(), add_bos=False))
    finally:
        llm.close()
    assert 180 <= n <= 240


def test_tiny_llama_q8_0_validates(tiny_llama_f32_gguf: Path, tmp_path: Path) -> None:
    q8 = quantize_gguf(tiny_llama_f32_gguf, tmp_path / "q8.gguf", "Q8_0", threads=2).path
    result = validate_gguf(q8, tiny_llama_f32_gguf, "Q8_0", golden=(), threads=2)
    assert result.passed and result.metric == "top1_agreement"
    assert result.reference == tiny_llama_f32_gguf.name
    assert result.threshold == THRESHOLDS["Q8_0"].min_agreement
    # Random weights give nearly flat logits: Q8_0 barely moves them (measured 1.0 / ~1e-7).
    assert result.value >= 0.99
    assert 0.0 <= result.details["mean_kl"] < 1e-3
    assert result.details["positions"] >= 180
    assert result.details["golden"] == []


def test_the_reference_is_scored_once_for_several_quants(
    tiny_llama_f32_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build validates several quants (devices, a step up, a retry without flash attention)
    against one intermediate: its scores are computed once, and again after it changes."""
    import edgepack.build.gguf_validate as gv

    scored: list[str] = []
    real = gv._score_text

    def counted(path, *a, **kw):
        scored.append(Path(path).name)
        return real(path, *a, **kw)

    monkeypatch.setattr(gv, "_score_text", counted)
    monkeypatch.setattr(gv, "_last_reference", None)
    q8 = quantize_gguf(tiny_llama_f32_gguf, tmp_path / "q8.gguf", "Q8_0", threads=2).path
    q4 = quantize_gguf(tiny_llama_f32_gguf, tmp_path / "q4.gguf", "Q4_0", threads=2).path
    with gv.reference_scores_kept():  # as run_build holds it
        first = validate_gguf(q8, tiny_llama_f32_gguf, "Q8_0", golden=(), threads=2)
        validate_gguf(q4, tiny_llama_f32_gguf, "Q4_0", golden=(), threads=2, check=False)
        again = validate_gguf(q8, tiny_llama_f32_gguf, "Q8_0", golden=(), threads=2)
        assert scored == [tiny_llama_f32_gguf.name, "q8.gguf", "q4.gguf", "q8.gguf"]
        assert again.value == first.value and again.details["mean_kl"] == first.details["mean_kl"]
        copy = tmp_path / "ref.gguf"  # another file (or the same one rewritten) is scored anew
        copy.write_bytes(tiny_llama_f32_gguf.read_bytes())
        validate_gguf(q8, copy, "Q8_0", golden=(), threads=2)
        assert scored[-2:] == ["ref.gguf", "q8.gguf"]
        assert gv._last_reference is not None
    # Leaving the build frees the scores; outside one, nothing is kept.
    assert gv._last_reference is None
    validate_gguf(q8, copy, "Q8_0", golden=(), threads=2)
    validate_gguf(q8, copy, "Q8_0", golden=(), threads=2)
    assert scored[-4:] == ["ref.gguf", "q8.gguf", "ref.gguf", "q8.gguf"]
    assert gv._last_reference is None


@pytest.mark.slow
def test_a_different_model_fails_validation(
    tiny_llama_f32_gguf: Path, smollm2_f16_gguf: Path, tmp_path: Path
) -> None:
    """Same tokenizer, different weights: the figures must catch it (exit 5)."""
    q8 = quantize_gguf(tiny_llama_f32_gguf, tmp_path / "q8.gguf", "Q8_0", threads=2).path
    with pytest.raises(BuildError) as err:
        validate_gguf(q8, smollm2_f16_gguf, "Q8_0", golden=(), threads=2)
    assert err.value.exit_code == 5
    assert "top-token agreement" in err.value.message and "mean KL" in err.value.message
    result = validate_gguf(q8, smollm2_f16_gguf, "Q8_0", golden=(), threads=2, check=False)
    assert not result.passed and result.value < 0.5 and result.details["mean_kl"] > 1.0


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0"])
def test_smollm2_quant_validates_and_says_paris(
    quant: str, smollm2_quants: dict, smollm2_f16_gguf: Path
) -> None:
    result = validate_gguf(smollm2_quants[quant], smollm2_f16_gguf, quant, threads=2)
    assert result.passed
    limits = THRESHOLDS[quant]
    assert result.value >= limits.min_agreement
    assert result.details["mean_kl"] <= limits.max_kl
    (answer,) = result.details["golden"]
    assert answer["prompt"] == "What is the capital of France?"
    assert "Paris" in answer["answer"] and answer["passed"]


@pytest.mark.slow
def test_failed_golden_prompt_or_strict_threshold_is_a_build_error(
    smollm2_quants: dict, smollm2_f16_gguf: Path
) -> None:
    # Q4_0 with a golden prompt it cannot answer that way and Q8_0's bar, asked for explicitly:
    # both failures are named in one error (one validation run keeps this test affordable).
    impossible = (GoldenPrompt("What is the capital of France?", "Ouagadougou"),)
    with pytest.raises(BuildError) as err:
        validate_gguf(
            smollm2_quants["Q4_0"], smollm2_f16_gguf, "Q4_0", golden=impossible,
            min_agreement=0.9, threads=2,
        )  # fmt: skip
    assert err.value.exit_code == 5
    assert re.search(r"top-token agreement 0\.\d+ \(min 0\.9\)", err.value.message)
    assert "without 'Ouagadougou'" in err.value.message


def test_golden_defaults_to_capital_of_france() -> None:
    assert DEFAULT_GOLDEN == (GoldenPrompt("What is the capital of France?", "Paris"),)


def test_minilm_is_detected_as_embedding_model(
    minilm_f32_gguf: Path, tiny_llama_f32_gguf: Path
) -> None:
    assert is_embedding_model(minilm_f32_gguf)
    assert not is_embedding_model(tiny_llama_f32_gguf)


@pytest.mark.slow
def test_minilm_f16_gguf_matches_sentence_transformers(
    minilm_f32_gguf: Path, minilm_dir: Path, tmp_path: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    f16 = quantize_gguf(minilm_f32_gguf, tmp_path / "minilm-f16.gguf", "F16", threads=2).path
    got = embed_texts(f16, EMBEDDING_TEXTS, threads=2)
    st = SentenceTransformer(str(minilm_dir), device="cpu")
    want = st.encode(list(EMBEDDING_TEXTS), convert_to_numpy=True).astype("float64")
    assert got.shape == want.shape == (len(EMBEDDING_TEXTS), 384)
    assert cosine_rows(got, want).min() >= 0.999

    result = validate_gguf(f16, minilm_f32_gguf, "F16", threads=2)
    assert result.metric == "min_cosine" and result.passed and result.value >= 0.999


@pytest.mark.slow
def test_minilm_q4_0_fails_the_q8_0_bar(minilm_f32_gguf: Path, tmp_path: Path) -> None:
    q4 = quantize_gguf(minilm_f32_gguf, tmp_path / "minilm-q4_0.gguf", "Q4_0", threads=2).path
    result = validate_gguf(q4, minilm_f32_gguf, "Q4_0", threads=2)
    assert result.passed  # measured min cosine 0.970 >= 0.94
    with pytest.raises(BuildError, match="cosine 0.9"):
        validate_gguf(q4, minilm_f32_gguf, "Q4_0", min_cosine=0.998, threads=2)
