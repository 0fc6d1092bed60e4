"""Pulling models and reading their metadata from the Hugging Face hub (build side).

Everything here is pinned to a commit sha: a branch or tag is resolved once, then every file
is fetched at that sha, so a build is reproducible even if the branch moves under it.
``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_HUB_CACHE`` are read
from the environment at call time (huggingface_hub itself reads them at import time, which
would make behaviour depend on import order).

Works with huggingface_hub 0.36 (requests) and 1.x/2.x (httpx). Device-side code must never
import this module.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.build.model_card import (
    README,
    LicensePolicy,
    ModelCard,
    card_from_files,
    card_from_folder,
    check_card_file_size,
    is_license_file,
)
from edgepack.build.model_files import (
    PYTORCH_INDEX,
    SAFETENSORS_INDEX,
    TensorSpec,
    check_disk_space,
    expand_shards,
    folder_files,
    header_length,
    parse_safetensors_header,
    read_json,
    read_local_header,
    select_files,
    sha256_file,
    shard_names,
    weight_files_of,
)
from edgepack.errors import BuildError, FetchError, UsageError

_SMALL_JSON = ("tokenizer_config.json", "generation_config.json")

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_./-]{0,254}$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")



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


@dataclass(frozen=True)
class ModelMetadata:
    """Everything the planner reads, without weights. ``sha`` is None for a local folder."""

    ref: ModelRef
    repo_id: str | None
    sha: str | None
    config: dict[str, Any]
    tokenizer_config: dict[str, Any] | None
    generation_config: dict[str, Any] | None
    safetensors: dict[str, dict[str, TensorSpec]]  # weight file -> tensor -> (dtype, shape)
    files: tuple[RepoFile, ...]
    weight_files: tuple[str, ...]
    card: ModelCard = ModelCard()  # licence and lineage, read before any weight byte


@dataclass(frozen=True)
class PulledModel:
    ref: ModelRef
    repo_id: str | None
    sha: str | None
    folder: Path
    files: dict[str, str]  # relative path -> sha256 of every file used


# -- references ------------------------------------------------------------------------------
def parse_model_ref(ref: str) -> ModelRef:
    """Parse ``org/name``, ``org/name@revision`` or a path to an existing local folder.

    A local folder wins over a hub id of the same spelling. Raises UsageError otherwise.
    """
    text = ref.strip()
    if text and Path(text).expanduser().is_dir():
        return ModelRef(text=text, path=Path(text).expanduser().resolve())
    repo_id, sep, revision = text.partition("@")
    if (_REPO_ID.match(repo_id) and "--" not in repo_id and ".." not in repo_id
            and (not sep or (_REVISION.match(revision) and ".." not in revision))):
        return ModelRef(text=text, repo_id=repo_id, revision=revision or "main")
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text
    if looks_like_path and "@" not in text:
        raise UsageError(f"model folder {text!r} does not exist",
                         hint="pass an existing folder with config.json, or a hub id org/name")
    raise UsageError(f"model reference {text!r} is neither a hub id nor an existing folder",
                     hint="expected org/name, org/name@revision (branch, tag or commit sha) "
                          "or a path to a local model folder")


# -- settings read at call time --------------------------------------------------------------
def hub_endpoint(endpoint: str | None = None) -> str:
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return env in {"1", "true", "yes", "on"} or bool(constants.HF_HUB_OFFLINE)


def _token(token: str | None) -> str | None:
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


# -- error mapping ---------------------------------------------------------------------------
def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level error classes of whichever HTTP stack huggingface_hub uses."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import requests

        found.append(requests.RequestException)
    except ImportError:
        pass
    for name in ("httpx2", "httpx"):
        try:
            module = __import__(name)
            found.append(module.TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


# Errors of a response body that stopped early, by class name across HTTP stacks: requests'
# ChunkedEncodingError, urllib3's ProtocolError/IncompleteRead, httpx's RemoteProtocolError and
# ReadError. They differ from a refused connection: the hub was reached, the link died.
_BROKE_OFF = frozenset({"ChunkedEncodingError", "IncompleteRead", "ProtocolError",
                        "RemoteProtocolError", "ReadError"})


def _broke_off(e: BaseException) -> bool:
    seen: BaseException | None = e
    for _ in range(8):  # the cause chain, bounded
        if seen is None:
            return False
        if type(seen).__name__ in _BROKE_OFF:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _fetch_error(e: BaseException, repo_id: str, revision: str, endpoint: str,
                 filename: str | None = None) -> FetchError | BuildError:
    """Translate a huggingface_hub or transport error into edgepack's tree, naming the value.

    Order matters: GatedRepoError subclasses RepositoryNotFoundError, and LocalEntryNotFoundError
    subclasses EntryNotFoundError (0.36 and 2.x alike).
    """
    from huggingface_hub import errors as hf

    where = f"{repo_id}@{revision}"
    if isinstance(e, hf.GatedRepoError):
        return FetchError(
            f"model {repo_id} is gated and this request has no access to it",
            hint=f"accept the licence on {endpoint}/{repo_id}, then set HF_TOKEN to a token "
                 "of the account that accepted it")
    if isinstance(e, hf.RepositoryNotFoundError):
        return FetchError(
            f"model repo {repo_id!r} was not found on {endpoint}",
            hint="check the id (org/name); for a private repo set HF_TOKEN to a token with "
                 "read access; HF_ENDPOINT selects the hub")
    if isinstance(e, hf.RevisionNotFoundError):
        return FetchError(
            f"revision {revision!r} was not found in {repo_id}",
            hint=f"use a branch, tag or full commit sha; list them with "
                 f"huggingface_hub.HfApi().list_repo_refs({repo_id!r}), "
                 f"or open {endpoint}/{repo_id}/tree/main")
    if isinstance(e, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        return FetchError(
            f"{where} is not in the local cache and the hub cannot be used "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}, "
            f"HF_ENDPOINT={endpoint})",
            hint="pull it once while online (unset HF_HUB_OFFLINE), or check that HF_ENDPOINT "
                 "is reachable; HF_HUB_CACHE/HF_HOME choose the cache")
    if isinstance(e, hf.EntryNotFoundError):
        return FetchError(
            f"file {filename or '?'} does not exist in {where}",
            hint="the repo does not hold the file edgepack needs; check the model id and revision")
    if isinstance(e, hf.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", "?")
        return FetchError(f"the hub at {endpoint} answered HTTP {status} for {where}: "
                          f"{str(e).splitlines()[0]}",
                          hint="retry later; check HF_ENDPOINT and HF_TOKEN")
    if isinstance(e, OSError) and getattr(e, "errno", None) == 28:  # ENOSPC
        return BuildError(f"the disk filled up while downloading {where}: {e}",
                          hint="free some space or point HF_HUB_CACHE at a larger disk")
    if _broke_off(e):
        return FetchError(
            f"the connection to the hub at {endpoint} dropped while downloading "
            f"{filename + ' of ' if filename else ''}{where} ({type(e).__name__}: {e})",
            hint="retry the command; huggingface_hub resumes the partial file from the cache")
    if isinstance(e, _transport_errors()):
        return FetchError(
            f"could not reach the hub at {endpoint} for {where} ({type(e).__name__}: {e})",
            hint="check the network and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache")
    return FetchError(f"download of {where} from {endpoint} failed: {e}",
                      hint="retry the command; a partial download resumes from the cache")


def _hub_call(fn: Any, *args: Any, _ctx: tuple[str, str, str, str | None], **kwargs: Any) -> Any:
    """Run a huggingface_hub call, mapping its errors (edgepack errors pass through)."""
    from huggingface_hub import errors as hf

    mapped: tuple[type[BaseException], ...] = (
        hf.HfHubHTTPError, hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled,
        hf.EntryNotFoundError, OSError, *_transport_errors(),
    )
    try:
        return fn(*args, **kwargs)
    except mapped as e:
        raise _fetch_error(e, *_ctx) from e


# -- hub calls -------------------------------------------------------------------------------
def resolve_revision(repo_id: str, revision: str = "main", token: str | None = None,
                     endpoint: str | None = None) -> str:
    """The commit sha ``revision`` (branch, tag or sha) points at. Raises FetchError."""
    from huggingface_hub import HfApi

    ep = hub_endpoint(endpoint)
    info = _hub_call(HfApi(endpoint=ep, token=_token(token)).model_info, repo_id,
                     revision=revision, _ctx=(repo_id, revision, ep, None))
    return str(info.sha)


def _repo_listing(ref: ModelRef, token: str | None, ep: str) -> tuple[str, list[RepoFile]]:
    sha, files, _gated = repo_info(ref, token, ep)
    return sha, files


def repo_info(ref: ModelRef, token: str | None,
               ep: str) -> tuple[str, list[RepoFile], str | None]:
    """(commit sha, files, gated) of ``ref``; gated is the hub's "auto"/"manual" or None."""
    from huggingface_hub import HfApi

    assert ref.repo_id is not None
    info = _hub_call(HfApi(endpoint=ep, token=_token(token)).model_info, ref.repo_id,
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
    readme = _download(ref, sha, README, token, ep, cache) if README in sizes else None
    licenses = {n: _download(ref, sha, n, token, ep, cache) for n in wanted if n != README}
    return card_from_files(readme, licenses, gated)


def _download(ref: ModelRef, sha: str, filename: str, token: str | None, ep: str,
              cache_dir: Path) -> Path:
    from huggingface_hub import hf_hub_download

    assert ref.repo_id is not None
    return Path(_hub_call(hf_hub_download, ref.repo_id, filename, revision=sha,
                          cache_dir=cache_dir, token=_token(token), endpoint=ep,
                          _ctx=(ref.repo_id, ref.revision, ep, filename)))


def ranged_get(url: str, start: int, end: int, token: str | None, ctx: tuple) -> bytes:
    """Bytes ``start..end`` (inclusive) of a hub file through huggingface_hub's own session
    (its proxies, user agent and token handling; redirects to the CDN are followed)."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = {**build_hf_headers(token=_token(token)), "Range": f"bytes={start}-{end}"}

    def get() -> bytes:
        response = get_session().get(url, headers=headers)
        hf_raise_for_status(response)
        if response.status_code != 206:
            raise FetchError(f"{url} answered {response.status_code} to a Range request",
                             hint="the hub or a proxy ignores Range; check HF_ENDPOINT")
        return bytes(response.content)

    return _hub_call(get, _ctx=ctx)


def _remote_header(ref: ModelRef, sha: str, filename: str, token: str | None,
                   ep: str) -> dict[str, TensorSpec]:
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


def _local_metadata(ref: ModelRef, folder: Path, repo_id: str | None,
                    sha: str | None) -> ModelMetadata:
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder} has no config.json",
                         hint="point at a Hugging Face model folder (config.json + weights)")
    names = folder_files(folder)
    selected = expand_shards(folder, select_files(names, ref=ref.text), ref.text)
    weights = weight_files_of(selected)
    missing = [w for w in weights if not (folder / w).is_file()]
    if missing:
        raise FetchError(f"{folder} lacks weight files {', '.join(missing)}",
                         hint="the download is incomplete; pull again while online")
    optional = {n: read_json(folder / n) if (folder / n).is_file() else None for n in _SMALL_JSON}
    return ModelMetadata(
        ref=ref, repo_id=repo_id, sha=sha, config=read_json(folder / "config.json"),
        tokenizer_config=optional["tokenizer_config.json"],
        generation_config=optional["generation_config.json"],
        safetensors={w: read_local_header(folder / w) for w in weights
                     if w.endswith(".safetensors")},
        files=tuple(RepoFile(n, (folder / n).stat().st_size) for n in names),
        weight_files=tuple(weights))


def read_model_metadata(ref: ModelRef | str, token: str | None = None,
                        endpoint: str | None = None,
                        cache_dir: str | os.PathLike[str] | None = None,
                        policy: LicensePolicy | None = None) -> ModelMetadata:
    """The model card and licence texts, config.json (+ tokenizer/generation config) and every
    safetensors header, without downloading weights: two ranged reads per weight file.
    Offline, reads the cache.

    ``policy`` is checked on the card before any byte of a weight file (header included) is
    requested. Raises UsageError (bad ref), ConfigError (licence refused, malformed card),
    FetchError (hub/network), BuildError (no weights).
    """
    ref = parse_model_ref(ref) if isinstance(ref, str) else ref
    if ref.path is not None:
        return _checked_local(ref, ref.path, None, None, policy)
    assert ref.repo_id is not None
    ep, cache = hub_endpoint(endpoint), hub_cache_dir(cache_dir)
    if hub_offline():
        folder = cached_snapshot(ref, token, ep, cache)
        return _checked_local(ref, folder, ref.repo_id, folder.name, policy)
    sha, files, gated = repo_info(ref, token, ep)
    names = [f.path for f in files]
    card = remote_card(ref, sha, files, gated, token, ep, cache)
    if policy is not None:
        policy.check(card, f"{ref.repo_id}@{sha[:12]}")
    selected = select_files(names, ref=ref.text)
    config = read_json(_download(ref, sha, "config.json", token, ep, cache))
    optional = {n: read_json(_download(ref, sha, n, token, ep, cache)) if n in names else None
                for n in _SMALL_JSON}
    for index in (SAFETENSORS_INDEX, PYTORCH_INDEX):
        if index in selected:
            index_path = _download(ref, sha, index, token, ep, cache)
            selected = sorted(set(selected) | set(shard_names(read_json(index_path), index)))
    weights = weight_files_of(selected)
    absent = [w for w in weights if w not in names]
    if absent:
        raise FetchError(f"{ref.repo_id}@{sha[:12]} index lists missing shards "
                         f"{', '.join(absent)}", hint="the repo is broken; tell its owner")
    return ModelMetadata(
        ref=ref, repo_id=ref.repo_id, sha=sha, config=config,
        tokenizer_config=optional["tokenizer_config.json"],
        generation_config=optional["generation_config.json"],
        safetensors={w: _remote_header(ref, sha, w, token, ep) for w in weights
                     if w.endswith(".safetensors")},
        files=tuple(files), weight_files=tuple(weights), card=card)


def _checked_local(ref: ModelRef, folder: Path, repo_id: str | None, sha: str | None,
                   policy: LicensePolicy | None) -> ModelMetadata:
    """A local folder or cached snapshot: the card first (the policy may refuse it), then the
    rest. The hub's gated flag is not known offline, so it stays None."""
    card = card_from_folder(folder)
    if policy is not None:
        policy.check(card, ref.text)
    return dataclasses.replace(_local_metadata(ref, folder, repo_id, sha), card=card)


# -- pull ------------------------------------------------------------------------------------
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


def pull_model(ref: ModelRef | str, token: str | None = None,
               cache_dir: str | os.PathLike[str] | None = None, progress: bool = True,
               endpoint: str | None = None) -> PulledModel:
    """Download the files a build needs, pinned to the commit sha the revision resolves to,
    and hash them. With HF_HUB_OFFLINE=1 (or when the hub cannot be reached) the cached
    snapshot is used, its sha taken from the cache. A local folder is hashed in place.

    Raises UsageError, FetchError (hub, network, corrupt download), BuildError (no weights,
    no disk space).
    """
    ref = parse_model_ref(ref) if isinstance(ref, str) else ref
    if ref.path is not None:
        meta = _local_metadata(ref, ref.path, None, None)
        names = expand_shards(ref.path, select_files([f.path for f in meta.files]), ref.text)
        return PulledModel(ref, None, None, ref.path,
                           verify_and_hash(ref.path, names, {}, ref.text))
    assert ref.repo_id is not None
    ep, cache = hub_endpoint(endpoint), hub_cache_dir(cache_dir)
    if hub_offline():
        return _pull_from_cache(ref, token, ep, cache)
    try:
        sha, files = _repo_listing(ref, token, ep)
    except FetchError as e:
        from huggingface_hub.errors import HfHubHTTPError

        # The hub could not be reached at all (0.36's HTTP errors are requests errors too):
        # use the cache as huggingface_hub itself does.
        cause = e.__cause__
        if isinstance(cause, _transport_errors()) and not isinstance(cause, HfHubHTTPError):
            return _pull_from_cache(ref, token, ep, cache)
        raise
    where = f"{ref.repo_id}@{sha[:12]}"
    selected = select_files([f.path for f in files], ref=ref.text)
    by_name = {f.path: f for f in files}
    folder = download_snapshot(ref, sha, selected, by_name, token, ep, cache, progress)
    names = expand_shards(folder, selected, ref.text)
    if names != selected:  # sharded: fetch the shards the index names
        missing = [n for n in names if n not in by_name]
        if missing:
            raise FetchError(f"{where}: index lists missing shards {', '.join(missing)}",
                             hint="the repo is broken; tell its owner")
        folder = download_snapshot(ref, sha, names, by_name, token, ep, cache, progress)
    write_ref(cache, ref.repo_id, ref.revision, sha)
    return PulledModel(ref, ref.repo_id, sha, folder,
                       verify_and_hash(folder, names, by_name, where))


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
        return Path(_hub_call(snapshot_download, ref.repo_id, revision=sha,
                              allow_patterns=patterns, cache_dir=cache, token=_token(token),
                              endpoint=ep, _ctx=(ref.repo_id, ref.revision, ep, None)))
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()


def _pull_from_cache(ref: ModelRef, token: str | None, ep: str, cache: Path) -> PulledModel:
    folder = cached_snapshot(ref, token, ep, cache)
    sha = folder.name
    names = expand_shards(folder, select_files(folder_files(folder), ref=ref.text), ref.text)
    return PulledModel(ref, ref.repo_id, sha, folder,
                       verify_and_hash(folder, names, {}, f"{ref.repo_id}@{sha[:12]}"))
