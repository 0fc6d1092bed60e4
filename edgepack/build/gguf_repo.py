"""GGUF repositories as input: list a repo's .gguf files, read each one's header over HTTP
Range (no weights), and pull only the file(s) the plan picks (build side).

A GGUF repo is one whose files include ``.gguf`` files and no safetensors/PyTorch weights
(e.g. ``Qwen/Qwen2.5-0.5B-Instruct-GGUF``): there is nothing to convert, so the planner chooses
among the files it holds. Each candidate is a single file or a set of split parts named
``<stem>-00001-of-0000N.gguf`` (llama.cpp's ``gguf-split`` naming); a split set's tensors are
spread over its parts, so every part's header is read. ``mmproj`` files (vision projectors)
are not language models and are left out.

Headers are read with growing ranged requests (64 KiB, then what the parser says it needs,
doubling) up to :data:`MAX_HEADER_BYTES`: a header holds the vocabulary and merges (a few MiB
for a 150k-token vocabulary), and a file claiming more is refused rather than downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from edgepack.build.hub import PulledModel
from edgepack.build.hub_cache import cached_snapshot, download_snapshot, verify_and_hash, write_ref
from edgepack.build.hub_client import (
    ModelRef,
    RepoFile,
    hub_cache_dir,
    hub_endpoint,
    hub_offline,
    ranged_get,
    remote_card,
    repo_info,
)
from edgepack.build.model_card import LicensePolicy, ModelCard, card_from_folder
from edgepack.errors import BuildError, FetchError
from edgepack.plan.gguf_header import (
    GgufHeader,
    HeaderIncomplete,
    gguf_model_facts,
    parse_gguf_header,
    quality_kld,
    quant_label,
    split_parts,
)
from edgepack.plan.planner import FileChoice

FIRST_READ = 64 * 1024
MAX_HEADER_BYTES = 64 * 1024 * 1024
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class GgufRepo:
    """A GGUF repo (or local folder of GGUF files) as the planner and the build see it."""

    ref: ModelRef
    repo_id: str | None
    sha: str | None  # None for a local folder
    files: tuple[RepoFile, ...]
    card: ModelCard
    choices: tuple[FileChoice, ...]
    headers: Mapping[str, GgufHeader]  # first part's path -> its header
    header_bytes_read: int  # over the network (0 for a local folder)
    folder: Path | None = None  # local folder or cached snapshot
    offline: bool = False  # read from the cache (HF_HUB_OFFLINE): only cached files count


def gguf_candidates(names: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Candidate files of a listing: first part's path -> all its parts, in order.

    Raises BuildError for an incomplete split set (a part missing from the repo).
    """
    singles: dict[str, tuple[str, ...]] = {}
    splits: dict[tuple[str, int], dict[int, str]] = {}
    for name in sorted(names):
        base = name.rsplit("/", 1)[-1]
        if not base.endswith(".gguf") or "mmproj" in base.lower():
            continue
        parts = split_parts(name)
        if parts is None:
            singles[name] = (name,)
        else:
            stem, i, n = parts
            splits.setdefault((stem, n), {})[i] = name
    for (stem, n), found in splits.items():
        missing = [i for i in range(1, n + 1) if i not in found]
        if missing:
            raise BuildError(
                f"split GGUF {stem} lacks part(s) {', '.join(map(str, missing))} of {n}",
                hint="the repo is incomplete; pick another quantization with --quant",
            )
        singles[found[1]] = tuple(found[i] for i in range(1, n + 1))
    return singles


def is_gguf_listing(names: Sequence[str]) -> bool:
    """True when ``names`` hold GGUF files and no weights a converter would read."""
    top_weights = [n for n in names if "/" not in n and n.endswith(_WEIGHT_SUFFIXES)]
    return not top_weights and any(n.endswith(".gguf") for n in names) and bool(
        gguf_candidates(names))


def is_gguf_folder(folder: Path) -> bool:
    return is_gguf_listing(_folder_names(folder))


def _folder_names(folder: Path) -> list[str]:
    """Files under ``folder``, relative, without huggingface_hub's .cache/ bookkeeping."""
    rels = (p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    return sorted(r.as_posix() for r in rels if r.parts[0] != ".cache")


def read_header(read: Callable[[int, int], bytes], size: int | None, name: str,
                limit: int = MAX_HEADER_BYTES) -> tuple[GgufHeader, int]:
    """Parse a GGUF header through ``read(start, end)`` (inclusive byte range) without reading
    past it more than needed; returns (header, bytes read). Raises BuildError past ``limit``."""
    buf = b""
    want = FIRST_READ
    while True:
        end = want - 1 if size is None else min(want, size) - 1
        if end >= len(buf):
            buf += read(len(buf), end)
        try:
            return parse_gguf_header(buf, name), len(buf)
        except HeaderIncomplete as more:
            if size is not None and len(buf) >= size:
                raise BuildError(f"{name} ends inside its GGUF header ({size} bytes)",
                                 hint="the file is truncated; pick another file") from None
            if more.need > limit or len(buf) >= limit:
                raise BuildError(
                    f"the GGUF header of {name} is larger than {limit // 2**20} MiB",
                    hint="edgepack reads at most this much to plan; the file is unusual or "
                         "damaged") from None
            want = min(limit, max(more.need, 2 * len(buf)))


def _choice(first: str, parts: tuple[str, ...], headers: Sequence[GgufHeader],
            sizes: Mapping[str, int | None]) -> FileChoice:
    head = headers[0]
    tensors = [t for h in headers for t in h.tensors]
    facts = gguf_model_facts(head, tensors, name=first)
    label = quant_label(first, head)
    bpw = 8.0 * sum(t.nbytes for t in tensors) / max(1, facts.n_params)
    kld, basis = quality_kld(label, bpw)
    return FileChoice(path=first, files=parts, quant=label, facts=facts, kld=kld,
                      kld_basis=basis)


def read_gguf_repo(ref: ModelRef, names_sizes: Sequence[RepoFile], sha: str,
                   gated: str | None, token: str | None = None, endpoint: str | None = None,
                   cache_dir: str | os.PathLike[str] | None = None,
                   policy: LicensePolicy | None = None) -> GgufRepo:
    """Headers of every candidate file of a hub GGUF repo at ``sha`` (ranged reads only).

    ``policy`` is checked on the model card before any byte of a .gguf file is requested.
    Raises ConfigError (licence), FetchError (hub), BuildError (no usable file).
    """
    from huggingface_hub import hf_hub_url

    assert ref.repo_id is not None
    ep, cache = hub_endpoint(endpoint), hub_cache_dir(cache_dir)
    names = [f.path for f in names_sizes]
    sizes = {f.path: f.size for f in names_sizes}
    card = remote_card(ref, sha, list(names_sizes), gated, token, ep, cache)
    if policy is not None:
        policy.check(card, f"{ref.repo_id}@{sha[:12]}")
    headers: dict[str, GgufHeader] = {}
    choices = []
    total = 0
    for first, parts in gguf_candidates(names).items():
        part_headers = []
        for part in parts:
            url = hf_hub_url(ref.repo_id, part, revision=sha, endpoint=ep)
            ctx = (ref.repo_id, ref.revision, ep, part)

            def read(start: int, end: int, url: str = url, ctx: tuple = ctx) -> bytes:
                return ranged_get(url, start, end, token, ctx)

            header, n = read_header(read, sizes.get(part), part)
            total += n
            part_headers.append(header)
        headers[first] = part_headers[0]
        choices.append(_choice(first, parts, part_headers, sizes))
    return GgufRepo(ref=ref, repo_id=ref.repo_id, sha=sha, files=tuple(names_sizes), card=card,
                    choices=tuple(choices), headers=headers, header_bytes_read=total)


def read_gguf_folder(ref: ModelRef, folder: Path, repo_id: str | None = None,
                     sha: str | None = None,
                     policy: LicensePolicy | None = None) -> GgufRepo:
    """A local folder (or cached snapshot) of GGUF files, read from disk."""
    card = card_from_folder(folder)
    if policy is not None:
        policy.check(card, ref.text)
    names = _folder_names(folder)
    headers: dict[str, GgufHeader] = {}
    choices = []
    sizes = {n: (folder / n).stat().st_size for n in names}
    for first, parts in gguf_candidates(names).items():
        part_headers = []
        for part in parts:
            with open(folder / part, "rb") as f:

                def read_local(start: int, end: int, f: BinaryIO = f) -> bytes:
                    f.seek(start)
                    return f.read(end - start + 1)

                part_headers.append(read_header(read_local, sizes[part], part)[0])
        headers[first] = part_headers[0]
        choices.append(_choice(first, parts, part_headers, sizes))
    files = tuple(RepoFile(n, sizes[n]) for n in names)
    return GgufRepo(ref=ref, repo_id=repo_id, sha=sha, files=files, card=card,
                    choices=tuple(choices), headers=headers, header_bytes_read=0, folder=folder)


def probe_gguf_repo(ref: ModelRef, token: str | None = None, endpoint: str | None = None,
                    cache_dir: str | os.PathLike[str] | None = None,
                    policy: LicensePolicy | None = None) -> GgufRepo | None:
    """The GGUF repo ``ref`` names, or None when it is a checkpoint to convert.

    One repo-info request; headers are read only for a GGUF repo. Offline (HF_HUB_OFFLINE),
    the cached snapshot's GGUF files are the candidates.
    """
    if ref.path is not None:
        return read_gguf_folder(ref, ref.path, policy=policy) if is_gguf_folder(
            ref.path) else None
    assert ref.repo_id is not None
    ep, cache = hub_endpoint(endpoint), hub_cache_dir(cache_dir)
    if hub_offline():
        try:
            folder = cached_snapshot(ref, token, ep, cache)
        except FetchError:
            return None  # the checkpoint path reports the missing cache
        if not is_gguf_folder(folder):
            return None
        return replace(read_gguf_folder(ref, folder, ref.repo_id, folder.name, policy),
                       offline=True)
    sha, files, gated = repo_info(ref, token, ep)
    if not is_gguf_listing([f.path for f in files]):
        return None
    return read_gguf_repo(ref, files, sha, gated, token, ep, cache, policy)


def pull_gguf_files(repo: GgufRepo, paths: Sequence[str], token: str | None = None,
                    endpoint: str | None = None,
                    cache_dir: str | os.PathLike[str] | None = None,
                    progress: bool = True) -> PulledModel:
    """Download exactly ``paths`` (pinned to the repo's sha) and hash them, each checked
    against the hub's size and LFS sha256. A local folder is hashed in place."""
    names = sorted(set(paths))
    if repo.folder is not None:
        digests = verify_and_hash(repo.folder, names, {}, repo.ref.text)
        return PulledModel(repo.ref, repo.repo_id, repo.sha, repo.folder, digests)
    ref = repo.ref
    assert ref.repo_id is not None and repo.sha is not None
    ep, cache = hub_endpoint(endpoint), hub_cache_dir(cache_dir)
    by_name = {f.path: f for f in repo.files}
    folder = download_snapshot(ref, repo.sha, names, by_name, token, ep, cache, progress)
    write_ref(cache, ref.repo_id, ref.revision, repo.sha)
    where = f"{ref.repo_id}@{repo.sha[:12]}"
    return PulledModel(ref, ref.repo_id, repo.sha, folder,
                       verify_and_hash(folder, names, by_name, where))
