"""Tiny random-weight checkpoints of every supported family, saved by transformers 4 AND 5.

``family_checkpoint("qwen2", 5)`` is the folder tests/support/checkpoint_writer.py wrote for
Qwen2 with transformers 5; ``... , 4)`` the same model written by the build venv's transformers
4. The transformers-5 writer runs in its own venv (transformers 5 cannot live beside
optimum-onnx 0.1.0, which pins ``transformers<4.58``), created once under the test-model cache:
torch 2.13.0 first (a CPU build that pip finds locally; any other request would fetch a
multi-GB CUDA build), then ``transformers==TRANSFORMERS5``.

Cache layout (``tests/support/models.py``'s root)::

    venv-transformers-<TRANSFORMERS5>/
    families-<FAMILIES_VERSION>/tokenizer-spm/     the SentencePiece source (trained here)
    families-<FAMILIES_VERSION>/tf4/<family>/       written by transformers 4
    families-<FAMILIES_VERSION>/tf5/<family>/       written by transformers 5

Each generation's folder set is written in one process (imports dominate: ~2 min for all nine
families on a loaded 2-core machine) into a temporary folder renamed into place.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from support.models import _locked, build_tiny_llama, cache_root, minilm_path

TRANSFORMERS5 = "5.24.0"
TORCH = "2.13.0"
FAMILIES_VERSION = "2"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "bert")
CHAT_FAMILIES = FAMILIES[:-1]
WRITER = Path(__file__).with_name("checkpoint_writer.py")


class Transformers5Unavailable(RuntimeError):
    """The transformers-5 venv could not be created (no package index reachable)."""


def transformers5_python(root: Path | None = None) -> Path:
    """The python of a cached venv holding transformers ``TRANSFORMERS5`` (created once)."""
    root = root or cache_root()
    venv = root / f"venv-transformers-{TRANSFORMERS5}"
    python = venv / "bin" / "python"
    if (venv / ".complete").is_file():
        return python
    with _locked(root / ".venv-transformers5.lock"):
        if (venv / ".complete").is_file():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        base = getattr(sys, "_base_executable", sys.executable)
        steps = [
            [base, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "-q", f"torch=={TORCH}"],
            [str(python), "-m", "pip", "install", "-q", f"transformers=={TRANSFORMERS5}",
             "safetensors", "sentencepiece", "protobuf", "jinja2"],
        ]
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                raise Transformers5Unavailable(
                    f"{' '.join(cmd[:6])} failed:\n{(proc.stdout + proc.stderr)[-1500:]}"
                )
        (venv / ".complete").write_text(TRANSFORMERS5 + "\n")
    return python


def _spm_source(out: Path) -> None:
    """A 400-piece SentencePiece BPE model, Llama-style (identity normalizer, byte fallback)."""
    import sentencepiece as spm

    rng = random.Random(0)
    words = (
        "the capital of France is Paris and a model answers questions about cities rivers "
        "numbers code python function return value list dictionary hello world what is how "
        "many two plus three equals five water boils at degrees celsius sun rises in east"
    ).split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(3000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        num_threads=1, minloglevel=2,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "legacy": False,
    }))


def _families_root(root: Path | None) -> Path:
    return (root or cache_root()) / f"families-{FAMILIES_VERSION}"


def family_checkpoints(generation: int, root: Path | None = None) -> Path:
    """Folder holding ``<family>/`` for every family, written by transformers ``generation``."""
    if generation not in (4, 5):
        raise ValueError(f"transformers generation must be 4 or 5, got {generation}")
    base = _families_root(root)
    final = base / f"tf{generation}"
    if all((final / f / "edgepack-fixture.json").is_file() for f in FAMILIES):
        return final
    base.mkdir(parents=True, exist_ok=True)
    python = Path(sys.executable) if generation == 4 else transformers5_python(root)
    with _locked(base / f".tf{generation}.lock"):
        if all((final / f / "edgepack-fixture.json").is_file() for f in FAMILIES):
            return final
        spm_dir = base / "tokenizer-spm"
        with _locked(base / ".spm.lock"):
            if not (spm_dir / "tokenizer.model").is_file():
                tmp_spm = Path(tempfile.mkdtemp(prefix=".spm-", dir=base))
                _spm_source(tmp_spm)
                os.rename(tmp_spm, spm_dir)
        tmp = Path(tempfile.mkdtemp(prefix=f".tf{generation}-", dir=base))
        os.chmod(tmp, 0o755)
        try:
            cmd = [str(python), str(WRITER), str(tmp), *FAMILIES,
                   "--bpe", str(build_tiny_llama(root)), "--spm", str(spm_dir),
                   "--wordpiece", str(minilm_path())]
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"checkpoint_writer.py (transformers {generation}) failed:\n"
                    + (proc.stdout + proc.stderr)[-3000:]
                )
            for leftover in tmp.glob(".*-tokenizer-source"):
                shutil.rmtree(leftover)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def family_checkpoint(family: str, generation: int, root: Path | None = None) -> Path:
    """The tiny ``family`` checkpoint written by transformers ``generation`` (4 or 5)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    return family_checkpoints(generation, root) / family
