"""Pulling models and reading their metadata from the Hugging Face hub (build side).

Everything here is pinned to a commit sha: a branch or tag is resolved once, then every file
is fetched at that sha, so a build is reproducible even if the branch moves under it.
``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_HUB_CACHE`` are read
from the environment at call time (huggingface_hub itself reads them at import time, which
would make behaviour depend on import order).

This module reads model metadata and pulls models; the parts it uses live next to it:
``hub_client`` (settings, repo listing, single files, ranged reads), ``hub_cache`` (snapshot
download into the cache, offline lookup, file checks) and ``hub_errors`` (error mapping).

Works with huggingface_hub 0.36 (requests) and 1.x/2.x (httpx). Device-side code must never
import this module.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.build.hub_cache import cached_snapshot, download_snapshot, verify_and_hash, write_ref
from edgepack.build.hub_client import (
    ModelRef,
    RepoFile,
    download_file,
    hub_cache_dir,
    hub_endpoint,
    hub_offline,
    remote_card,
    remote_header,
    repo_info,
)
from edgepack.build.hub_errors import transport_errors
from edgepack.build.model_card import LicensePolicy, ModelCard, card_from_folder
from edgepack.build.model_files import (
    PYTORCH_INDEX,
    SAFETENSORS_INDEX,
    TensorSpec,
    expand_shards,
    folder_files,
    read_json,
    read_local_header,
    select_files,
    shard_names,
    weight_files_of,
)
from edgepack.errors import FetchError, UsageError

_SMALL_JSON = ("tokenizer_config.json", "generation_config.json")

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_./-]{0,254}$")


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
    config = read_json(download_file(ref, sha, "config.json", token, ep, cache))
    optional = {n: read_json(download_file(ref, sha, n, token, ep, cache)) if n in names else None
                for n in _SMALL_JSON}
    for index in (SAFETENSORS_INDEX, PYTORCH_INDEX):
        if index in selected:
            index_path = download_file(ref, sha, index, token, ep, cache)
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
        safetensors={w: remote_header(ref, sha, w, token, ep) for w in weights
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
        sha, files, _gated = repo_info(ref, token, ep)
    except FetchError as e:
        from huggingface_hub.errors import HfHubHTTPError

        # The hub could not be reached at all (0.36's HTTP errors are requests errors too):
        # use the cache as huggingface_hub itself does.
        cause = e.__cause__
        if isinstance(cause, transport_errors()) and not isinstance(cause, HfHubHTTPError):
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


def _pull_from_cache(ref: ModelRef, token: str | None, ep: str, cache: Path) -> PulledModel:
    folder = cached_snapshot(ref, token, ep, cache)
    sha = folder.name
    names = expand_shards(folder, select_files(folder_files(folder), ref=ref.text), ref.text)
    return PulledModel(ref, ref.repo_id, sha, folder,
                       verify_and_hash(folder, names, {}, f"{ref.repo_id}@{sha[:12]}"))
