"""Validate a quantized GGUF against its unquantized (f16/f32) intermediate with llama.cpp.

Causal language models: both files score the same fixed English paragraph with
``logits_all=True``; from the logits (float64 log-softmax, numpy) we compute the **top-token
agreement** (how often both pick the same most likely next token) and the **mean KL divergence**
KL(reference ‖ quantized) over all positions. Distribution figures alone are not enough (a
SmolLM2 Q4_K_M with 0.86 agreement once answered "What is the capital of France?" with French
gibberish), so chat models also answer **golden prompts** greedily through their own chat
template, and each answer must contain an expected string.

Embedding models (BERT family, or any GGUF with a pooling type): the pooled embeddings of fixed
sentences are compared by cosine similarity; the metric is the minimum over sentences.

Only one model is loaded at a time: the reference's figures are computed first and it is freed
before the quantized file is loaded.

Thresholds (``THRESHOLDS``) come from measurements, each loosened by a margin so a healthy file
of a similar model passes and a broken one does not. Causal: SmolLM2-135M-Instruct, f16
intermediate as reference, REFERENCE_TEXT (207 positions), llama-cpp-python 0.3.36, x86-64 CPU.
Embeddings: all-MiniLM-L6-v2, f32 intermediate as reference, EMBEDDING_TEXTS. Margins: about
0.06-0.10 off the agreement (one position is 0.005 of it), 2.5-4x the KL, and about 3x the
distance ``1 - cosine``. SmolLM2's rows are 576 wide (not a multiple of 256), so its K-quants
fall back to Q5_0/Q8_0 for most tensors; that is why Q5_K_M scores like Q5_0 and Q3_K_M beats
Q4_0 there. Note that Q4_K_M passes the figures and still fails the golden prompt ("La femme de
France, le Grand Croix...") -- reproduced here, which is why golden prompts are checked.

=======  =============  =======  ===========  =======  ==============  ==========
quant    agreement      min      mean KL      max      MiniLM min cos  min cos
=======  =============  =======  ===========  =======  ==============  ==========
F16      (= reference)  0.98     --           0.002    0.999999        0.999
Q8_0     0.937          0.88     0.0041       0.015    0.99957         0.998
Q6_K     0.913          0.85     0.0103       0.035    0.99920         0.997
Q5_K_M   0.802          0.72     0.0799       0.20     --              0.99
Q5_0     0.807          0.72     0.0809       0.25     --              0.99
Q4_K_M   0.816 *golden  0.72     0.0507       0.20     0.99166         0.97
Q4_0     0.647          0.55     0.2700       0.80     0.96989         0.94
Q3_K_M   0.739          0.50     0.1129       1.00     --              0.92
Q2_K     0.633          0.45     0.3887       1.50     0.95814         0.88
=======  =============  =======  ===========  =======  ==============  ==========

Quant names not measured take the row of their nearest measured neighbour.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.build.gguf_quantize import quant_type, read_gguf_metadata
from edgepack.errors import BuildError, ValidationFailed

# A fixed, plain English paragraph (about 200 tokens with a GPT-2 style BPE). Written for this
# module; changing it changes every stored validation figure, so treat it as versioned.
REFERENCE_TEXT_VERSION = 1
REFERENCE_TEXT = (
    "The old lighthouse stood at the end of a narrow stone pier, and for more than a hundred "
    "years its keepers had climbed the same spiral stairs every evening to light the lamp. "
    "In the early days the light came from a wick soaked in whale oil, which had to be trimmed "
    "every few hours through the night. Later the keepers burned kerosene, and in 1931 the "
    "tower was finally connected to the electric grid of the nearby town. The last keeper, a "
    "quiet man named Thomas, kept a logbook in which he recorded the weather, the ships that "
    "passed, and the birds that rested on the railing during storms. When the light was "
    "automated, he moved into a small house on the hill, but he still walked down to the pier "
    "each morning to check that the glass was clean. Visitors today can read his logbook in "
    "the museum, where it lies open at the page describing the great storm of 1952, when the "
    "waves reached the top of the gallery and the lamp never once went dark."
)

EMBEDDING_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Edge devices run small language models without a network connection.",
    "Paris is the capital and largest city of France.",
    "How do I reset my password if I no longer have access to my email?",
    "Quantization stores neural network weights with fewer bits per value.",
    "A warm bowl of soup is welcome on a cold winter evening.",
)


@dataclass(frozen=True)
class GoldenPrompt:
    """A chat question whose greedy answer must contain ``expect`` (case-sensitive)."""

    prompt: str
    expect: str


DEFAULT_GOLDEN: tuple[GoldenPrompt, ...] = (
    GoldenPrompt("What is the capital of France?", "Paris"),
)


@dataclass(frozen=True)
class Threshold:
    min_agreement: float  # causal LM: top-token agreement must be at least this
    max_kl: float  # causal LM: mean KL(reference || quantized) must be at most this
    min_cosine: float  # embeddings: the lowest cosine over EMBEDDING_TEXTS


THRESHOLDS: dict[str, Threshold] = {
    "F32": Threshold(0.99, 0.001, 0.9999),
    "F16": Threshold(0.98, 0.002, 0.999),
    "BF16": Threshold(0.96, 0.01, 0.998),
    "Q8_0": Threshold(0.88, 0.015, 0.998),
    "Q6_K": Threshold(0.85, 0.035, 0.997),
    "Q5_K_M": Threshold(0.72, 0.20, 0.99),
    "Q5_K_S": Threshold(0.72, 0.20, 0.99),
    "Q5_1": Threshold(0.72, 0.25, 0.99),
    "Q5_0": Threshold(0.72, 0.25, 0.99),
    "Q4_K_M": Threshold(0.72, 0.20, 0.97),
    "Q4_K_S": Threshold(0.70, 0.25, 0.96),
    "Q4_1": Threshold(0.55, 0.80, 0.94),
    "Q4_0": Threshold(0.55, 0.80, 0.94),
    "IQ4_NL": Threshold(0.55, 0.80, 0.94),
    "Q3_K_L": Threshold(0.50, 1.00, 0.92),
    "Q3_K_M": Threshold(0.50, 1.00, 0.92),
    "Q3_K_S": Threshold(0.45, 1.20, 0.90),
    "Q2_K": Threshold(0.45, 1.50, 0.88),
}


@dataclass(frozen=True)
class ValidationResult:
    """The figures stored in the manifest. ``metric``/``value``/``threshold`` is the headline;
    ``details`` holds the rest (KL, positions, golden answers, per-sentence cosines)."""

    metric: str
    value: float
    threshold: float
    passed: bool
    reference: str
    details: dict[str, Any] = field(default_factory=dict)


def threshold_for(quant: str) -> Threshold:
    """The default threshold of a quant name; raises BuildError for an unknown one."""
    return THRESHOLDS[quant_type(quant).name]


def is_embedding_model(path: Path) -> bool:
    """True when the GGUF is an encoder/embedding model (it declares a pooling type)."""
    meta = read_gguf_metadata(path)
    arch = str(meta.get("general.architecture", ""))
    return f"{arch}.pooling_type" in meta or arch in {"bert", "nomic-bert", "jina-bert-v2"}


def validate_gguf(
    quantized: Path,
    reference: Path,
    quant: str,
    *,
    golden: Sequence[GoldenPrompt] | None = None,
    min_agreement: float | None = None,
    max_kl: float | None = None,
    min_cosine: float | None = None,
    threads: int | None = None,
    n_ctx: int | None = None,
    check: bool = True,
    flash_attn: bool = False,
) -> ValidationResult:
    """Compare ``quantized`` with its unquantized ``reference`` GGUF and answer golden prompts.

    Embedding models are detected from the GGUF header and compared by cosine. For causal
    models, ``golden`` defaults to :data:`DEFAULT_GOLDEN` when the GGUF has a chat template and
    to none otherwise; pass ``()`` to skip (e.g. for random-weight test models). The thresholds
    default to :data:`THRESHOLDS` for ``quant``; a caller may pass its own explicitly.

    With ``check`` (the default) a failed validation raises ValidationFailed (exit 5) naming the
    figures; otherwise the result comes back with ``passed=False``. Raises BuildError also when
    a file cannot be loaded or the two files tokenize the text differently.

    ``n_ctx`` None sizes the context from the texts (see :func:`validation_ctx`).

    ``flash_attn``: run the quantized model with llama.cpp's flash-attention kernels, as the
    server will (a causal model's server runs what it was validated with, server.toml's
    ``flash_attn``); the reference always runs without, as the original's closest rendition.
    """
    limits = threshold_for(quant)
    quantized, reference = Path(quantized), Path(reference)
    threads = int(threads or os.cpu_count() or 1)
    embedding = is_embedding_model(reference)
    if golden is None and not embedding:
        has_template = "tokenizer.chat_template" in read_gguf_metadata(quantized)
        golden = DEFAULT_GOLDEN if has_template else ()
    if n_ctx is None:
        n_ctx = validation_ctx(reference, () if golden is None else tuple(golden))
    if embedding:
        result = _validate_embeddings(
            quantized,
            reference,
            min_cosine if min_cosine is not None else limits.min_cosine,
            threads,
            n_ctx,
        )
    else:
        result = _validate_causal(
            quantized,
            reference,
            min_agreement if min_agreement is not None else limits.min_agreement,
            max_kl if max_kl is not None else limits.max_kl,
            tuple(golden or ()),
            threads,
            n_ctx,
            flash_attn,
        )
    if check and not result.passed:
        summary = _describe_failure(result)
        raise ValidationFailed(
            f"{quantized.name} ({quant}) failed validation against {reference.name}: "
            + summary,
            checks=_failed_checks(result), summary=summary,
            hint=_failure_hint(result, quant),
        )
    return result


# Room a chat template may add around a golden question (system prompt, role markers), and
# the answer's length; the context is rounded up to this step.
_TEMPLATE_ALLOWANCE = 128
ANSWER_TOKENS = 48
_CTX_STEP = 64
# Quantization types at or above which no larger quantization is worth suggesting.
_TOP_QUANTS = frozenset({"Q8_0", "F16", "BF16", "F32"})


def validation_ctx(path: Path, golden: Sequence[GoldenPrompt] = ()) -> int:
    """The context validation needs for ``path``: the reference text (or the embedding
    texts) and each golden question with its answer, rounded up to 64 tokens and capped at the
    model's trained context (the reference text is then scored over what fits).

    Counted with the model's own tokenizer (a vocabulary-only load): a small vocabulary needs
    many more tokens for the same text than a 50k one, so no fixed size fits every model.
    """
    from llama_cpp import Llama

    meta = read_gguf_metadata(path)
    arch = str(meta.get("general.architecture", ""))
    n_train = int(str(meta.get(f"{arch}.context_length") or 2048))
    # A vocabulary-only load still makes a context, and llama.cpp then warns that its 512
    # tokens exceed the (absent, so 0) trained context: noise on the build's stderr, which
    # `build --json -q` promises to keep empty. llama-cpp-python's log hook prints through
    # sys.stderr, so it is caught here and shown only if the load fails.
    caught = io.StringIO()
    try:
        with contextlib.redirect_stderr(caught):
            vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise BuildError(f"llama.cpp could not load {path}: {e} {caught.getvalue().strip()}",
                         hint="the conversion did not finish; rebuild it") from e
    try:
        def count(text: str) -> int:
            return len(vocab.tokenize(text.encode(), add_bos=True, special=False))

        if is_embedding_model(path):
            need = max(count(t) for t in EMBEDDING_TEXTS) + 2
        else:
            need = count(REFERENCE_TEXT) + 1
        for g in golden:
            need = max(need, count(g.prompt) + _TEMPLATE_ALLOWANCE + ANSWER_TOKENS)
    finally:
        vocab.close()
    return max(_CTX_STEP, min(-(-need // _CTX_STEP) * _CTX_STEP, n_train))


def _failure_hint(result: ValidationResult, quant: str) -> str:
    """The options that change each failed check (and a larger quant only when one exists)."""
    tips = []
    if quant_type(quant).name not in _TOP_QUANTS:
        tips.append("a larger --quant (e.g. Q8_0 or Q6_K)")
    d = result.details
    if result.metric == "min_cosine":
        tips.append(f"--min-cosine below {result.threshold} if this quality is acceptable")
    else:
        if result.value < result.threshold:
            tips.append(f"--min-agreement below {result.threshold} if this is acceptable")
        if d.get("mean_kl", 0.0) > d.get("max_kl_threshold", float("inf")):
            tips.append(f"--max-kl above {d['max_kl_threshold']} if this is acceptable")
        if any(not g["passed"] for g in d.get("golden", ())):
            tips.append(
                "--golden 'PROMPT=>EXPECTED' with a question this model answers, or "
                "--no-golden (the default question may be beyond a small or untrained model)"
            )
    return "try " + "; ".join(tips) if tips else "see the figures above"


# --- causal language models ---------------------------------------------------------------


def _validate_causal(
    quantized: Path,
    reference: Path,
    min_agreement: float,
    max_kl: float,
    golden: tuple[GoldenPrompt, ...],
    threads: int,
    n_ctx: int,
    flash_attn: bool = False,
) -> ValidationResult:
    import numpy as np

    ref_tokens, ref_logprobs = _reference_scores(reference, threads, n_ctx)
    q_tokens, q_logprobs, answers = _score_text(quantized, threads, n_ctx, golden=golden,
                                                flash_attn=flash_attn)
    if q_tokens != ref_tokens:
        raise BuildError(
            f"{quantized.name} and {reference.name} tokenize the validation text differently "
            f"({len(q_tokens)} vs {len(ref_tokens)} tokens)",
            hint="the quantized file must come from the same intermediate GGUF",
        )
    agreement = float(np.mean(ref_logprobs.argmax(axis=1) == q_logprobs.argmax(axis=1)))
    kl_per_pos = np.sum(np.exp(ref_logprobs) * (ref_logprobs - q_logprobs), axis=1)
    mean_kl = float(np.mean(kl_per_pos))
    golden_ok = all(a["passed"] for a in answers)
    passed = agreement >= min_agreement and mean_kl <= max_kl and golden_ok
    return ValidationResult(
        metric="top1_agreement",
        value=round(agreement, 4),
        threshold=min_agreement,
        passed=passed,
        reference=reference.name,
        details={
            "mean_kl": round(mean_kl, 5),
            "max_kl_threshold": max_kl,
            "p99_kl": round(float(np.quantile(kl_per_pos, 0.99)), 5),
            "positions": int(len(ref_tokens)),
            "text_version": REFERENCE_TEXT_VERSION,
            "golden": answers,
            "flash_attn": flash_attn,
        },
    )


# The reference's scores of the last validation, kept inside ``reference_scores_kept()``: a
# build validates several quants (devices, a step up, a retry without flash attention) against
# the same intermediate, and scoring it costs as much as scoring a quant. One entry is 207
# positions x the vocabulary in float64: 81 MB for a 49k vocabulary, 212 MB for 128k, so it
# lives only as long as the build that reuses it, not as long as a process that embeds
# edgepack.api.
_last_reference: tuple[tuple[Any, ...], Any, Any] | None = None
_keeping = 0


@contextlib.contextmanager
def reference_scores_kept() -> Iterator[None]:
    """Within this block, a reference's scores are computed once and reused while its file
    (path, size, mtime), the thread count and the context stay the same; freed on leaving."""
    global _keeping, _last_reference
    _keeping += 1
    try:
        yield
    finally:
        _keeping -= 1
        if not _keeping:
            _last_reference = None


def _reference_scores(path: Path, threads: int, n_ctx: int) -> tuple[Any, Any]:
    """``_score_text`` of the unquantized reference, reused inside ``reference_scores_kept``."""
    global _last_reference
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, threads, n_ctx)
    if _last_reference is not None and _last_reference[0] == key:
        return _last_reference[1], _last_reference[2]
    _last_reference = None  # free the old scores before computing new ones
    tokens, logprobs, _ = _score_text(path, threads, n_ctx)
    if _keeping:
        _last_reference = (key, tokens, logprobs)
    return tokens, logprobs


def _score_text(path: Path, threads: int, n_ctx: int, golden: tuple[GoldenPrompt, ...] = (),
                flash_attn: bool = False) -> Any:
    """Tokens, float64 log-softmax of every position for REFERENCE_TEXT, and the answers to
    ``golden``; the model is freed before returning."""
    import numpy as np

    llm = load_model(path, threads, n_ctx, logits_all=True, flash_attn=flash_attn)
    try:
        # A model whose context is shorter than the text is scored over the part that fits.
        tokens = llm.tokenize(REFERENCE_TEXT.encode(), add_bos=True)[: n_ctx - 1]
        llm.reset()
        llm.eval(tokens)
        logits = np.array(llm.scores[: len(tokens)], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return tokens, logprobs, [answer_golden(llm, g) for g in golden]
    finally:
        llm.close()
        del llm
        gc.collect()


def answer_golden(llm: Any, golden: GoldenPrompt) -> dict[str, Any]:
    llm.reset()
    out = llm.create_chat_completion(
        messages=[{"role": "user", "content": golden.prompt}],
        temperature=0.0,
        max_tokens=ANSWER_TOKENS,
        seed=0,
    )
    text = out["choices"][0]["message"]["content"] or ""
    return {
        "prompt": golden.prompt,
        "expect": golden.expect,
        "answer": text.strip(),
        "passed": golden.expect in text,
    }


# --- embedding models ----------------------------------------------------------------------


def _validate_embeddings(
    quantized: Path, reference: Path, min_cosine: float, threads: int, n_ctx: int
) -> ValidationResult:
    import numpy as np

    ref = embed_texts(reference, EMBEDDING_TEXTS, threads=threads, n_ctx=n_ctx)
    got = embed_texts(quantized, EMBEDDING_TEXTS, threads=threads, n_ctx=n_ctx)
    cosines = cosine_rows(ref, got)
    worst = float(np.min(cosines))
    return ValidationResult(
        metric="min_cosine",
        value=round(worst, 6),
        threshold=min_cosine,
        passed=worst >= min_cosine,
        reference=reference.name,
        details={
            "mean_cosine": round(float(np.mean(cosines)), 6),
            "sentences": len(EMBEDDING_TEXTS),
        },
    )


def embed_texts(path: Path, texts: Sequence[str], *, threads: int = 1, n_ctx: int = 512) -> Any:
    """Pooled embeddings (numpy, float64, one row per text) from a GGUF embedding model."""
    import numpy as np

    llm = load_model(path, threads, n_ctx, embedding=True)
    try:
        return np.array(llm.embed(list(texts), normalize=False), dtype=np.float64)
    finally:
        llm.close()
        del llm
        gc.collect()


def cosine_rows(a: Any, b: Any) -> Any:
    """Row-wise cosine similarity of two equally shaped 2-D arrays."""
    import numpy as np

    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# --- shared -------------------------------------------------------------------------------


def load_model(path: Path, threads: int, n_ctx: int, **kwargs: Any) -> Any:
    from llama_cpp import Llama

    if not path.is_file():
        raise BuildError(f"cannot validate: {path} does not exist")
    try:
        return Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_threads=threads,
            verbose=False,
            **kwargs,
        )
    except (ValueError, RuntimeError) as e:
        raise BuildError(
            f"llama.cpp could not load {path}: {e}",
            hint="the file may be truncated or made by a newer llama.cpp",
        ) from e


def _failed_checks(result: ValidationResult) -> tuple[str, ...]:
    """The names of the checks ``result`` failed, as the manifest's step-up record names them."""
    if result.metric == "min_cosine":
        return ("min_cosine",)
    d = result.details
    checks = ["min_agreement"] if result.value < result.threshold else []
    if d.get("mean_kl", 0.0) > d.get("max_kl_threshold", float("inf")):
        checks.append("max_kl")
    if any(not g["passed"] for g in d.get("golden", ())):
        checks.append("golden")
    return tuple(checks)


def _describe_failure(result: ValidationResult) -> str:
    if result.metric == "min_cosine":
        return f"cosine {result.value} < {result.threshold}"
    d = result.details
    parts = [
        f"top-token agreement {result.value} (min {result.threshold})",
        f"mean KL {d['mean_kl']} (max {d['max_kl_threshold']})",
    ]
    parts += [
        f"golden prompt {g['prompt']!r} answered {g['answer']!r} without {g['expect']!r}"
        for g in d["golden"]
        if not g["passed"]
    ]
    return "; ".join(parts)
