"""The local hub answers the real huggingface_hub client the way huggingface.co does."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import build_hf_headers, get_session
from support.hub import HubServer, make_tiny_model, minilm_folder

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_snapshot_download_pinned_gets_exactly_the_allowed_files(local_hub: HubServer) -> None:
    folder = minilm_folder()
    sha = local_hub.add_repo(MINILM, folder, revision=("main", "v1"))
    assert HfApi(endpoint=local_hub.endpoint).model_info(MINILM, revision="v1").sha == sha

    patterns = ["config*.json", "tokenizer*", "*.safetensors", "1_Pooling/*"]
    out = Path(snapshot_download(MINILM, revision=sha, allow_patterns=patterns))

    got = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert got == ["1_Pooling/config.json", "config.json", "config_sentence_transformers.json",
                   "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert out.name == sha
    for rel in got:
        assert _sha256(out / rel) == _sha256(folder / rel), rel
    # The weights went through the redirect to the second ("CDN") origin.
    cdn = [r for r in local_hub.requests if r.origin == "cdn"]
    assert [r.path.rsplit("/", 1)[1] for r in cdn] == ["model.safetensors"]
    assert cdn[0].bytes_sent == (folder / "model.safetensors").stat().st_size


def test_head_of_large_lfs_file_redirects_to_other_origin(local_hub: HubServer) -> None:
    sha = local_hub.add_repo(MINILM, minilm_folder())
    url = hf_hub_url(MINILM, "model.safetensors", revision=sha, endpoint=local_hub.endpoint)
    from huggingface_hub import get_hf_file_metadata

    meta = get_hf_file_metadata(url)
    size = (minilm_folder() / "model.safetensors").stat().st_size
    assert meta.commit_hash == sha
    assert meta.etag == _sha256(minilm_folder() / "model.safetensors")
    assert meta.size == size
    assert meta.location.startswith(local_hub.cdn_endpoint + "/cdn/")
    # Small non-LFS files are served in place, with a git blob oid as ETag.
    small = get_hf_file_metadata(hf_hub_url(MINILM, "config.json", revision=sha,
                                            endpoint=local_hub.endpoint))
    content = (minilm_folder() / "config.json").read_bytes()
    assert small.etag == hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()
    assert small.location.startswith(local_hub.endpoint)


def test_range_requests_answer_206_with_exact_bytes(local_hub: HubServer) -> None:
    sha = local_hub.add_repo(MINILM, minilm_folder())
    data = (minilm_folder() / "model.safetensors").read_bytes()
    url = hf_hub_url(MINILM, "model.safetensors", revision=sha, endpoint=local_hub.endpoint)
    for spec, expected in (("0-7", data[:8]), ("100-199", data[100:200]),
                           ("-5", data[-5:]), (f"{len(data) - 3}-", data[-3:])):
        r = get_session().get(url, headers={**build_hf_headers(), "Range": f"bytes={spec}"})
        assert r.status_code == 206, spec
        assert r.content == expected, spec
        assert r.headers["Content-Range"].endswith(f"/{len(data)}")
    r = get_session().get(url, headers={"Range": f"bytes={len(data)}-"})
    assert r.status_code == 416
    assert [q.range for q in local_hub.requests if q.origin == "cdn"][:2] == ["bytes=0-7",
                                                                              "bytes=100-199"]


def test_repo_not_found(local_hub: HubServer) -> None:
    with pytest.raises(hf_errors.RepositoryNotFoundError) as info:
        HfApi(endpoint=local_hub.endpoint).model_info("nobody/nothing")
    assert not isinstance(info.value, hf_errors.GatedRepoError)
    local_hub.add_repo(MINILM, minilm_folder())
    local_hub.mark_missing(MINILM)
    with pytest.raises(hf_errors.RepositoryNotFoundError):
        hf_hub_download(MINILM, "config.json")


def test_gated_repo(local_hub: HubServer, tmp_path: Path) -> None:
    local_hub.add_repo("org/gated", make_tiny_model(tmp_path / "m"))
    local_hub.mark_gated("org/gated", allowed_tokens=["hf_good"])
    with pytest.raises(hf_errors.GatedRepoError) as anonymous:
        hf_hub_download("org/gated", "config.json")
    assert anonymous.value.response.status_code == 401
    with pytest.raises(hf_errors.GatedRepoError) as denied:
        hf_hub_download("org/gated", "config.json", token="hf_other")
    assert denied.value.response.status_code == 403
    assert Path(hf_hub_download("org/gated", "config.json", token="hf_good")).is_file()


def test_revision_not_found(local_hub: HubServer, tmp_path: Path) -> None:
    local_hub.add_repo("org/tiny", make_tiny_model(tmp_path / "m"))
    with pytest.raises(hf_errors.RevisionNotFoundError):
        HfApi(endpoint=local_hub.endpoint).model_info("org/tiny", revision="no-such-branch")
    with pytest.raises(hf_errors.RevisionNotFoundError):
        hf_hub_download("org/tiny", "config.json", revision="no-such-branch")


def test_entry_not_found(local_hub: HubServer, tmp_path: Path) -> None:
    local_hub.add_repo("org/tiny", make_tiny_model(tmp_path / "m"))
    with pytest.raises(hf_errors.EntryNotFoundError) as info:
        hf_hub_download("org/tiny", "nope.json")
    assert not isinstance(info.value, hf_errors.LocalEntryNotFoundError)


def test_tree_listing_and_revisions(local_hub: HubServer, tmp_path: Path) -> None:
    first = local_hub.add_repo("org/tiny", make_tiny_model(tmp_path / "a"))
    second = local_hub.add_repo("org/tiny", make_tiny_model(tmp_path / "b", layers=3),
                                revision=("main", "v2"))
    local_hub.add_revision("org/tiny", "v1", first)
    assert first != second
    api = HfApi(endpoint=local_hub.endpoint)
    assert api.model_info("org/tiny").sha == second
    assert api.model_info("org/tiny", revision="v1").sha == first
    assert api.model_info("org/tiny", revision=first).sha == first
    tree = {f.path: f for f in api.list_repo_tree("org/tiny", revision=first, recursive=True)}
    assert set(tree) == {"config.json", "generation_config.json", "model.safetensors"}
    st = tree["model.safetensors"]
    assert st.lfs is not None and st.lfs.sha256 == _sha256(tmp_path / "a" / "model.safetensors")


def test_truncate_serves_fewer_bytes_than_announced(local_hub: HubServer, tmp_path: Path) -> None:
    folder = make_tiny_model(tmp_path / "m")
    local_hub.add_repo("org/tiny", folder)
    local_hub.truncate("org/tiny", "model.safetensors", 10)
    with pytest.raises(OSError, match="Consistency check failed"):
        hf_hub_download("org/tiny", "model.safetensors")


def test_fail_next_injects_one_error(local_hub: HubServer, tmp_path: Path) -> None:
    local_hub.add_repo("org/tiny", make_tiny_model(tmp_path / "m"))
    api = HfApi(endpoint=local_hub.endpoint)
    local_hub.fail_next("/api/models/org/tiny", 403)
    with pytest.raises(hf_errors.HfHubHTTPError) as info:
        api.model_info("org/tiny")
    assert info.value.response.status_code == 403
    assert api.model_info("org/tiny").id == "org/tiny"
    assert [r.status for r in local_hub.requests] == [403, 200]
