"""The local copy of a hub snapshot: download it pinned to a sha into huggingface_hub's cache,
find it there offline, record branch -> sha, and check every file against the hub (build side).
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from edgepack.build.hub_client import ModelRef, RepoFile, hub_token
from edgepack.build.hub_errors import hub_call
from edgepack.build.model_files import check_disk_space, sha256_file
from edgepack.errors import FetchError

_SHA = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def cached_snapshot(ref: ModelRef, token: str | None, ep: str, cache: Path) -> Path:
    """The cached snapshot folder of ``ref``, found without network through the cache's
    documented layout (refs/<revision> holds the sha, snapshots/<sha>/ the files); read
    directly because huggingface_hub 2.x refuses a snapshot with files edgepack never wanted.
    Raises FetchError if it is not cached."""
    assert ref.repo_id is not None
    storage = cache / f"models--{ref.repo_id.replace('/', '--')}"
    ref_file = storage / "refs" / ref.revision
    sha = ref.revision if _SHA.match(ref.revision) else (
        ref_file.read_text().strip() if ref_file.is_file() else None)
    folder = storage / "snapshots" / sha if sha else None
    if folder is None or not folder.is_dir():
        offline = os.environ.get("HF_HUB_OFFLINE", "unset")
        raise FetchError(
            f"{ref.repo_id}@{ref.revision} is not in the local cache {cache} and the hub "
            f"cannot be used (HF_HUB_OFFLINE={offline}, HF_ENDPOINT={ep})",
            hint="pull it once while online (unset HF_HUB_OFFLINE), or check that HF_ENDPOINT "
                 "is reachable; HF_HUB_CACHE/HF_HOME choose the cache")
    return folder


def write_ref(cache: Path, repo_id: str, revision: str, sha: str) -> None:
    """Record ``revision -> sha`` in the cache's refs/ (huggingface_hub's documented layout),
    so an offline pull of the same branch finds the snapshot pinned by sha."""
    if revision == sha:
        return
    ref_path = cache / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    ref_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref_path.with_name(f".{ref_path.name}.tmp")
    tmp.write_text(sha)
    os.replace(tmp, ref_path)


def verify_and_hash(folder: Path, names: list[str], expected: dict[str, RepoFile],
                     where: str) -> dict[str, str]:
    """sha256 of every file; each must match the hub's size and LFS sha256, and the blob name
    of the cache (huggingface_hub names LFS blobs by their sha256). A bad file is removed from
    the cache so that the next pull fetches it again. Raises FetchError."""
    digests: dict[str, str] = {}
    for name in names:
        path = folder / name
        if not path.is_file():
            raise FetchError(f"{where}: {name} is missing from the download",
                             hint="pull again while online")
        digest = sha256_file(path)
        want = expected.get(name)
        blob = path.resolve().name
        problem = None
        if want is not None and want.size is not None and path.stat().st_size != want.size:
            problem = f"size {path.stat().st_size}, expected {want.size}"
        elif want is not None and want.lfs_sha256 and digest != want.lfs_sha256:
            problem = f"sha256 {digest}, expected {want.lfs_sha256}"
        elif _SHA256.match(blob) and digest != blob:
            problem = f"sha256 {digest}, expected {blob}"
        if problem:
            resolved = path.resolve()
            path.unlink(missing_ok=True)
            if resolved != path:
                resolved.unlink(missing_ok=True)
            raise FetchError(f"{where}: {name} is corrupt or truncated ({problem})",
                             hint="the damaged file was removed from the cache; run the "
                                  "command again to download it anew")
        digests[name] = digest
    return digests


def download_snapshot(ref: ModelRef, sha: str, names: list[str], sizes: dict[str, RepoFile],
              token: str | None, ep: str, cache: Path, progress: bool) -> Path:
    from huggingface_hub import snapshot_download, try_to_load_from_cache
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    assert ref.repo_id is not None
    needed = 0
    # Only what is not cached yet needs room.
    for name in names:
        if not isinstance(try_to_load_from_cache(ref.repo_id, name, cache_dir=cache,
                                                 revision=sha), str):
            needed += (sizes[name].size or 0) if name in sizes else 0
    cache.mkdir(parents=True, exist_ok=True)
    check_disk_space(cache, needed)
    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    try:
        # Exact names, escaped: allow_patterns are fnmatch patterns.
        patterns = [glob.escape(n) for n in names]
        return Path(hub_call(snapshot_download, ref.repo_id, revision=sha,
                             allow_patterns=patterns, cache_dir=cache, token=hub_token(token),
                             endpoint=ep, _ctx=(ref.repo_id, ref.revision, ep, None)))
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
