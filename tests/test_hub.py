"""edgepack.build.hub against the local hub (real huggingface_hub client, loopback HTTP)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from support.hub import HubServer, make_tiny_model, minilm_folder

from edgepack.build.hub import (
    parse_model_ref,
    pull_model,
    read_model_metadata,
)
from edgepack.build.hub_client import resolve_revision
from edgepack.build.model_files import (
    check_disk_space,
    select_files,
)
from edgepack.errors import BuildError, FetchError, UsageError

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub read HF_HUB_OFFLINE at import time: set both the variable and its copy.
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


# -- references and selection (no network) ---------------------------------------------------
def test_parse_model_ref_forms(tmp_path: Path) -> None:
    assert parse_model_ref("org/name").repo_id == "org/name"
    ref = parse_model_ref("org/name@v1.0")
    assert (ref.repo_id, ref.revision, ref.is_local) == ("org/name", "v1.0", False)
    assert parse_model_ref("org/name@refs/pr/1").revision == "refs/pr/1"
    local = parse_model_ref(str(make_tiny_model(tmp_path / "m")))
    assert local.is_local and local.path == (tmp_path / "m").resolve()


@pytest.mark.parametrize("bad", ["noslash", "org/name@", "a/b/c/d@x", "org//name", "org/na me",
                                 "./missing-folder", "org/name@..x"])
def test_parse_model_ref_rejects_bad_syntax(bad: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_model_ref(bad)
    assert info.value.exit_code == 2
    assert repr(bad.strip()) in info.value.message


def test_select_files_prefers_index_and_safetensors() -> None:
    files = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "consolidated.safetensors", "pytorch_model.bin",
             "README.md", "tokenizer.json", "onnx/model.onnx", "1_Pooling/config.json"]
    assert select_files(files) == ["1_Pooling/config.json", "config.json",
                                   "model.safetensors.index.json", "tokenizer.json"]
    assert select_files(["config.json", "pytorch_model.bin", "x.txt"]) == [
        "config.json", "pytorch_model.bin"]
    with pytest.raises(BuildError) as info:
        select_files(["config.json", "model.gguf"], ref="org/gguf-only")
    assert info.value.exit_code == 5 and "org/gguf-only" in info.value.message


def test_check_disk_space(tmp_path: Path) -> None:
    check_disk_space(tmp_path, 1)
    with pytest.raises(BuildError) as info:
        check_disk_space(tmp_path / "not" / "yet", 1 << 62)
    assert info.value.exit_code == 5 and str(1 << 62) in info.value.message


# -- metadata ----------------------------------------------------------------------------------
def test_metadata_reads_only_safetensors_header(local_hub: HubServer) -> None:
    sha = local_hub.add_repo(MINILM, minilm_folder())
    meta = read_model_metadata(MINILM)

    assert meta.sha == sha and meta.repo_id == MINILM
    assert meta.config["model_type"] == "bert"
    assert meta.tokenizer_config is not None
    header = meta.safetensors["model.safetensors"]
    assert header["embeddings.word_embeddings.weight"] == ("F32", (30522, 384))
    assert {f.path for f in meta.files} >= {"model.safetensors", "README.md"}

    weights = local_hub.file_requests("model.safetensors")
    gets = [r for r in weights if r.method == "GET"]
    assert gets and all(r.range is not None for r in gets)
    raw = (minilm_folder() / "model.safetensors").read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    assert sum(r.bytes_sent for r in gets) == 8 + header_size
    # Everything was pinned to the resolved commit.
    assert all(sha in r.path for r in local_hub.requests if "/resolve/" in r.path)


def test_metadata_of_sharded_model(local_hub: HubServer, tmp_path: Path) -> None:
    local_hub.add_repo("org/sharded", make_tiny_model(tmp_path / "m", layers=3, shards=2))
    meta = read_model_metadata("org/sharded@main")
    assert meta.weight_files == ("model-00001-of-00002.safetensors",
                                 "model-00002-of-00002.safetensors")
    merged = {k: v for h in meta.safetensors.values() for k, v in h.items()}
    assert merged["model.embed_tokens.weight"] == ("F32", (32, 8))
    assert merged["model.layers.2.mlp.up_proj.weight"] == ("F16", (16, 8))


def test_metadata_of_local_folder(tmp_path: Path) -> None:
    folder = make_tiny_model(tmp_path / "m")
    meta = read_model_metadata(str(folder))
    assert meta.sha is None and meta.repo_id is None
    assert meta.generation_config == {"max_new_tokens": 16}
    assert meta.safetensors["model.safetensors"]["model.layers.1.mlp.up_proj.weight"] == (
        "F16", (16, 8))


# -- pull --------------------------------------------------------------------------------------
def test_pull_pins_sha_hashes_files_then_works_offline(
        local_hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_tiny_model(tmp_path / "m", extra_files={"README.md": "# hi",
                                                          "tokenizer.json": "{}"})
    local_hub.redirect_threshold = 1  # weights go through the CDN redirect path
    sha = local_hub.add_repo("org/tiny", folder)
    assert resolve_revision("org/tiny", "main") == sha

    pulled = pull_model("org/tiny", progress=False)
    assert pulled.sha == sha and pulled.folder.name == sha
    assert set(pulled.files) == {"config.json", "generation_config.json", "model.safetensors",
                                 "tokenizer.json"}
    for rel, digest in pulled.files.items():
        assert digest == _sha256(folder / rel)
    resolves = [r for r in local_hub.requests if "/resolve/" in r.path]
    assert resolves and all(f"/resolve/{sha}/" in r.path for r in resolves)
    assert not [r for r in local_hub.requests if r.path.endswith("README.md")]

    local_hub.clear_log()
    _go_offline(monkeypatch)
    again = pull_model("org/tiny", progress=False)
    assert (again.sha, again.files, again.folder) == (pulled.sha, pulled.files, pulled.folder)
    assert local_hub.requests == []
    assert read_model_metadata("org/tiny").sha == sha
    assert local_hub.requests == []


def test_pull_offline_with_nothing_cached(local_hub: HubServer,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _go_offline(monkeypatch)
    with pytest.raises(FetchError) as info:
        pull_model("org/never-pulled")
    assert info.value.exit_code == 4
    assert "org/never-pulled" in info.value.message and "HF_HUB_OFFLINE" in info.value.message
    assert local_hub.requests == []


def test_pull_of_local_folder_hashes_in_place(tmp_path: Path) -> None:
    folder = make_tiny_model(tmp_path / "m", shards=2, layers=3)
    pulled = pull_model(str(folder))
    assert pulled.folder == folder.resolve() and pulled.sha is None
    assert pulled.files["model.safetensors.index.json"] == _sha256(
        folder / "model.safetensors.index.json")
    assert "model-00002-of-00002.safetensors" in pulled.files


def test_pull_sharded_fetches_index_shards(local_hub: HubServer, tmp_path: Path) -> None:
    folder = make_tiny_model(tmp_path / "m", shards=2, layers=3)
    (folder / "consolidated.safetensors").write_bytes((folder / "model-00001-of-00002.safetensors")
                                                       .read_bytes())
    local_hub.add_repo("org/sharded", folder)
    pulled = pull_model("org/sharded", progress=False)
    assert "model-00002-of-00002.safetensors" in pulled.files
    assert "consolidated.safetensors" not in pulled.files
    assert not local_hub.file_requests("consolidated.safetensors")


def test_gated_repo_needs_token(local_hub: HubServer, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    local_hub.add_repo("org/gated", make_tiny_model(tmp_path / "m"))
    local_hub.mark_gated("org/gated", allowed_tokens=["hf_ok"])
    with pytest.raises(FetchError) as info:
        pull_model("org/gated", progress=False)
    assert "org/gated" in info.value.message and "gated" in info.value.message
    assert "HF_TOKEN" in (info.value.hint or "")
    monkeypatch.setenv("HF_TOKEN", "hf_ok")
    assert pull_model("org/gated", progress=False).files


@pytest.mark.parametrize("ref, expected", [
    ("org/nope", "'org/nope' was not found"),
    ("org/tiny@no-such-branch", "revision 'no-such-branch' was not found"),
])
def test_missing_repo_and_revision(local_hub: HubServer, tmp_path: Path, ref: str,
                                   expected: str) -> None:
    local_hub.add_repo("org/tiny", make_tiny_model(tmp_path / "m"))
    for call in (pull_model, read_model_metadata):
        with pytest.raises(FetchError) as info:
            call(ref)
        assert info.value.exit_code == 4 and expected in info.value.message


def test_unreachable_endpoint_names_it(local_hub: HubServer, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    dead = "http://127.0.0.1:9"  # discard port: nothing listens on loopback
    with pytest.raises(FetchError) as info:
        pull_model("org/tiny", endpoint=dead, progress=False)
    assert dead in info.value.message and "HF_HUB_OFFLINE" in info.value.message


def test_repo_without_weights_is_a_build_error(local_hub: HubServer, tmp_path: Path) -> None:
    folder = tmp_path / "gguf-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model-q4.gguf").write_bytes(b"GGUF")
    local_hub.add_repo("org/gguf-only", folder)
    with pytest.raises(BuildError) as info:
        pull_model("org/gguf-only", progress=False)
    assert info.value.exit_code == 5 and "org/gguf-only" in info.value.message


def test_truncated_download_is_detected(local_hub: HubServer, tmp_path: Path) -> None:
    local_hub.add_repo("org/tiny", make_tiny_model(tmp_path / "m"))
    local_hub.truncate("org/tiny", "model.safetensors", 100)
    with pytest.raises(FetchError) as info:
        pull_model("org/tiny", progress=False)
    assert info.value.exit_code == 4 and "org/tiny" in info.value.message


def test_connection_dropped_mid_download_is_reported_as_such(local_hub: HubServer,
                                                            tmp_path: Path) -> None:
    # Issue #13: a link that dies mid-body was reported as "could not reach the hub".
    local_hub.add_repo("org/tiny", make_tiny_model(tmp_path / "m"))
    local_hub.drop("org/tiny", "model.safetensors", 100)
    with pytest.raises(FetchError) as info:
        pull_model("org/tiny", progress=False)
    msg = info.value.message
    assert info.value.exit_code == 4
    assert "could not reach" not in msg, msg
    assert "dropped while downloading" in msg and "org/tiny" in msg, msg


def test_corrupt_download_is_detected_and_evicted(local_hub: HubServer, tmp_path: Path) -> None:
    folder = make_tiny_model(tmp_path / "m")
    local_hub.add_repo("org/tiny", folder)
    local_hub.corrupt("org/tiny", "model.safetensors")
    with pytest.raises(FetchError) as info:
        pull_model("org/tiny", progress=False)
    assert "model.safetensors" in info.value.message and "sha256" in info.value.message
    local_hub._corrupted.clear()  # the hub heals; the bad blob must not be reused
    pulled = pull_model("org/tiny", progress=False)
    assert pulled.files["model.safetensors"] == _sha256(folder / "model.safetensors")
