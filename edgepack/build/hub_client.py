"""Calls to the Hugging Face hub: settings read at call time, the repo listing at a commit,
single small files and exact ranged reads (build side).

``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_HUB_CACHE`` are read
from the environment at call time (huggingface_hub itself reads them at import time, which
would make behaviour depend on import order). Errors are mapped by
:mod:`edgepack.build.hub_errors`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgepack.build.hub_errors import hub_call
from edgepack.build.model_card import (
    README,
    ModelCard,
    card_from_files,
    check_card_file_size,
    is_license_file,
)
from edgepack.build.model_files import TensorSpec, header_length, parse_safetensors_header
from edgepack.errors import FetchError


@dataclass(frozen=True)
class ModelRef:
    """What the user named: a hub repo (at a revision) or a local folder."""

    text: str
    repo_id: str | None = None
    revision: str = "main"
    path: Path | None = None

    @property
    def is_local(self) -> bool:
        return self.path is not None


@dataclass(frozen=True)
class RepoFile:
    path: str
    size: int | None
    lfs_sha256: str | None = None



# -- settings read at call time --------------------------------------------------------------
def hub_endpoint(endpoint: str | None = None) -> str:
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return env in {"1", "true", "yes", "on"} or bool(constants.HF_HUB_OFFLINE)


def hub_token(token: str | None) -> str | None:
    return token or os.environ.get("HF_TOKEN") or None


def hub_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    from huggingface_hub import constants

    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path(constants.HF_HUB_CACHE)


# -- hub calls -------------------------------------------------------------------------------
def resolve_revision(repo_id: str, revision: str = "main", token: str | None = None,
                     endpoint: str | None = None) -> str:
    """The commit sha ``revision`` (branch, tag or sha) points at. Raises FetchError."""
    from huggingface_hub import HfApi

    ep = hub_endpoint(endpoint)
    info = hub_call(HfApi(endpoint=ep, token=hub_token(token)).model_info, repo_id,
                    revision=revision, _ctx=(repo_id, revision, ep, None))
    return str(info.sha)


def repo_info(ref: ModelRef, token: str | None,
               ep: str) -> tuple[str, list[RepoFile], str | None]:
    """(commit sha, files, gated) of ``ref``; gated is the hub's "auto"/"manual" or None."""
    from huggingface_hub import HfApi

    assert ref.repo_id is not None
    info = hub_call(HfApi(endpoint=ep, token=hub_token(token)).model_info, ref.repo_id,
                    revision=ref.revision, files_metadata=True,
                    _ctx=(ref.repo_id, ref.revision, ep, None))
    files = [RepoFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None)
             for s in (info.siblings or [])]
    gated = getattr(info, "gated", None)
    return str(info.sha), files, (str(gated) if gated else None)


def remote_card(ref: ModelRef, sha: str, files: list[RepoFile], gated: str | None,
                 token: str | None, ep: str, cache: Path) -> ModelCard:
    """README.md and the licence texts at ``sha`` (small files: a few kB each). Their sizes
    are checked from the listing first, so an oversized "card" is never downloaded."""
    sizes = {f.path: f.size for f in files}
    wanted = [n for n in sizes if n == README or is_license_file(n)]
    for name in wanted:
        check_card_file_size(name, sizes[name])
    readme = download_file(ref, sha, README, token, ep, cache) if README in sizes else None
    licenses = {n: download_file(ref, sha, n, token, ep, cache) for n in wanted if n != README}
    return card_from_files(readme, licenses, gated)


def download_file(ref: ModelRef, sha: str, filename: str, token: str | None, ep: str,
                  cache_dir: Path) -> Path:
    """``filename`` at ``sha`` through huggingface_hub's cache; its path there."""
    from huggingface_hub import hf_hub_download

    assert ref.repo_id is not None
    return Path(hub_call(hf_hub_download, ref.repo_id, filename, revision=sha,
                         cache_dir=cache_dir, token=hub_token(token), endpoint=ep,
                         _ctx=(ref.repo_id, ref.revision, ep, filename)))


def ranged_get(url: str, start: int, end: int, token: str | None, ctx: tuple) -> bytes:
    """Bytes ``start..end`` (inclusive) of a hub file through huggingface_hub's own session
    (its proxies, user agent and token handling; redirects to the CDN are followed)."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = {**build_hf_headers(token=hub_token(token)), "Range": f"bytes={start}-{end}"}

    def get() -> bytes:
        response = get_session().get(url, headers=headers)
        hf_raise_for_status(response)
        if response.status_code != 206:
            raise FetchError(f"{url} answered {response.status_code} to a Range request",
                             hint="the hub or a proxy ignores Range; check HF_ENDPOINT")
        return bytes(response.content)

    return hub_call(get, _ctx=ctx)


def remote_header(ref: ModelRef, sha: str, filename: str, token: str | None,
                  ep: str) -> dict[str, TensorSpec]:
    """The safetensors header of ``filename`` at ``sha``, read without its weights."""
    from huggingface_hub import hf_hub_url

    assert ref.repo_id is not None
    url = hf_hub_url(ref.repo_id, filename, revision=sha, endpoint=ep)
    ctx = (ref.repo_id, ref.revision, ep, filename)
    # Two exact ranged reads: huggingface_hub's get_safetensors_metadata reads 100 kB up front.
    n = header_length(ranged_get(url, 0, 7, token, ctx), filename)
    raw = ranged_get(url, 8, 8 + n - 1, token, ctx)
    if len(raw) != n:
        raise FetchError(f"{filename}: got {len(raw)} of {n} header bytes",
                         hint="the download was cut short; retry")
    return parse_safetensors_header(raw, filename)
