"""edgepack.build.gguf_convert: llama.cpp's convert_hf_to_gguf.py from the matching sdist, run
for real."""

from __future__ import annotations

import json
import os
import re
import shutil
from importlib import metadata
from pathlib import Path

import pytest
from support.models import converter_environ

from edgepack.build import gguf_convert as converter
from edgepack.build.gguf_convert import (
    choose_intermediate_type,
    convert_to_gguf,
    ensure_converter,
    intermediate_path,
)
from edgepack.build.gguf_quantize import read_gguf_metadata, read_tensor_infos
from edgepack.errors import BuildError, ConfigError

LLAMA_CPP_PYTHON = metadata.version("llama-cpp-python")


def test_choose_intermediate_type() -> None:
    assert choose_intermediate_type(3_200_000) == "f32"  # the tiny test Llama
    assert choose_intermediate_type(22_700_000) == "f32"  # all-MiniLM-L6-v2
    assert choose_intermediate_type(134_500_000) == "f16"  # SmolLM2-135M
    with pytest.raises(BuildError, match="positive"):
        choose_intermediate_type(0)


def test_intermediate_path_is_keyed_by_source_converter_and_type(tmp_path: Path) -> None:
    conv = "llama-cpp-python 0.3.36 (llama.cpp 0c1e57098bba)"
    base = intermediate_path(tmp_path, "a" * 64, "f16", converter=conv)
    assert base.parent == tmp_path / "intermediate"
    assert base.name == f"{'a' * 64}-llama-cpp-python-0.3.36-llama.cpp-0c1e57098bba-f16.gguf"
    others = {
        intermediate_path(tmp_path, "b" * 64, "f16", converter=conv),
        intermediate_path(tmp_path, "a" * 64, "f32", converter=conv),
        intermediate_path(tmp_path, "a" * 64, "f16", converter="llama-cpp-python 0.3.37"),
    }
    assert base not in others and len(others) == 3
    with pytest.raises(BuildError, match="'q8_0'"):
        intermediate_path(tmp_path, "a" * 64, "q8_0", converter=conv)


def test_checkout_dir_must_hold_the_script(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="EDGEPACK_LLAMA_CPP_DIR"):
        ensure_converter({"EDGEPACK_LLAMA_CPP_DIR": str(tmp_path)})


def test_checkout_version_names_its_commit(tmp_path: Path) -> None:
    (tmp_path / "gguf-py" / "gguf").mkdir(parents=True)
    (tmp_path / "convert_hf_to_gguf.py").write_text("")
    git = tmp_path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/master\n")
    sha = "0123456789abcdef0123456789abcdef01234567"
    (git / "packed-refs").write_text(f"# pack-refs with: peeled\n{sha} refs/heads/master\n")
    source = ensure_converter({"EDGEPACK_LLAMA_CPP_DIR": str(tmp_path)})
    assert source.llama_cpp_commit == sha
    assert source.version.startswith("llama.cpp 0123456789ab (checkout ")


@pytest.mark.slow
def test_converter_from_sdist_of_installed_version(tmp_path: Path) -> None:
    # The session's cached copy (fetched by pip once per version into the test cache).
    source = ensure_converter(converter_environ())
    assert source.llama_cpp_python == LLAMA_CPP_PYTHON
    assert re.fullmatch(r"[0-9a-f]{40}", source.llama_cpp_commit or "")
    assert source.version == (
        f"llama-cpp-python {LLAMA_CPP_PYTHON} (llama.cpp {source.llama_cpp_commit[:12]})"
    )
    for needed in ("convert_hf_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/__init__.py"):
        assert (source.root / needed).is_file(), needed
    # Only what the script needs: not the whole llama.cpp tree (C sources, vocab test files).
    assert not (source.root / "src").exists()
    assert not list((source.root / "models").glob("*.gguf"))


@pytest.mark.slow
def test_fresh_home_fetches_and_extracts_atomically(tmp_path: Path) -> None:
    """A fresh EDGEPACK_HOME gets the sdist through pip (its cache makes this quick)."""
    # Without EDGEPACK_CACHE (the test session shares one), the cache lives in EDGEPACK_HOME.
    env = {k: v for k, v in os.environ.items() if k != "EDGEPACK_CACHE"}
    env["EDGEPACK_HOME"] = str(tmp_path)
    source = ensure_converter(env)
    root = tmp_path / "cache" / "converter" / LLAMA_CPP_PYTHON
    assert source.root == root
    info = json.loads((root / "edgepack-converter.json").read_text())
    assert info["llama_cpp_python"] == LLAMA_CPP_PYTHON
    assert info["sdist"] == f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    # Nothing left over from the download or the extraction.
    assert sorted(p.name for p in root.parent.iterdir()) == [LLAMA_CPP_PYTHON]
    # A second call uses the extracted copy.
    stamp = (root / "edgepack-converter.json").stat().st_mtime_ns
    assert ensure_converter(env) == source
    assert (root / "edgepack-converter.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_convert_tiny_llama_to_f32(tmp_path: Path, tiny_llama_dir: Path) -> None:
    out = convert_to_gguf(
        tiny_llama_dir, tmp_path / "tiny.gguf", "f32", environ=converter_environ()
    )
    assert out == tmp_path / "tiny.gguf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf", "tiny.gguf.convert.log"]
    tensors = read_tensor_infos(out)
    assert {t.type for t in tensors} == {"F32"}
    assert len(tensors) == 2 * 9 + 2  # per layer: q k v o gate up down + 2 norms; embd, norm
    meta = read_gguf_metadata(out)
    assert meta["general.architecture"] == "llama"
    assert meta["llama.embedding_length"] == 64
    # The rebuilt SmolLM2 tokenizer is recognised by the converter's pre-tokenizer hash check.
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert "<|im_start|>" in str(meta["tokenizer.chat_template"])
    assert "llama.cpp" in (tmp_path / "tiny.gguf.convert.log").read_text().splitlines()[0]


@pytest.mark.slow
def test_unsupported_architecture_is_a_build_error_with_the_log_tail(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out" / "model.gguf"
    with pytest.raises(BuildError) as err:
        convert_to_gguf(model, out, "f16", environ=converter_environ())
    assert err.value.exit_code == 5
    assert "Model NoSuchModelForCausalLM is not supported" in err.value.message
    assert str(out) + ".convert.log" in (err.value.hint or "")
    # No output and no temporary file left behind, only the log.
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf.convert.log"]


def test_folder_without_config_is_a_build_error(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="no config.json"):
        convert_to_gguf(tmp_path, tmp_path / "x.gguf", "f16")


def test_unknown_outtype_is_a_build_error(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="'bf16'"):
        convert_to_gguf(tmp_path, tmp_path / "x.gguf", "bf16")


def test_converter_subprocess_uses_vendored_gguf_first(tmp_path: Path) -> None:
    source = converter.ConverterSource(root=tmp_path, llama_cpp_python="0", llama_cpp_commit=None)
    env = converter._converter_env(source, {"PYTHONPATH": "/elsewhere", "NO_LOCAL_GGUF": "1"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(source.root / "gguf-py"), "/elsewhere"]
    assert "NO_LOCAL_GGUF" not in env
