"""Stage a release into ``slots/<version>``: fetch only what is missing, verify everything.

Sources, cheapest first: a file with the same sha256 in the current or previous slot; for a
chunked file, each chunk found in an installed file (through its saved chunk index) or in the
chunk cache; only then the network. Every chunk is checked against the signed index and every
file against the signed release before it is used; the bundle is checked against its
manifest; files, folders and the final rename are fsynced.

Device side: standard library, edgepack.errors/manifest/release and the agent's modules.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from edgepack.errors import FetchError, IntegrityError
from edgepack.manifest import MANIFEST_NAME, load_manifest, verify_bundle
from edgepack.ota.agent.fetcher import HttpFetcher
from edgepack.ota.agent.journal import crash_point
from edgepack.ota.agent.state import StateDir, fsync_dir
from edgepack.ota.release import (
    ChunkIndex,
    Release,
    ReleaseFile,
    chunk_path,
    index_target,
    parse_chunk_index,
    version_key,
)

RESERVE_BYTES = 16 * 1024 * 1024  # left free so logs and the journal still fit


class NoSpaceError(FetchError):
    """Not enough free disk to stage the update; the current bundle is untouched."""


@dataclass
class StageStats:
    bytes_local: int = 0
    bytes_downloaded: int = 0
    chunks_local: int = 0
    chunks_downloaded: int = 0


def _sha256_of(path: Path, offset: int = 0, size: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = size if size is not None else -1
        while left != 0:
            block = f.read(1 << 20 if left < 0 else min(1 << 20, left))
            if not block:
                break
            h.update(block)
            left -= len(block) if left > 0 else 0
    return h.hexdigest()


class Stager:
    """Builds one release into a verified slot. ``fetch_target(path)`` returns the
    TUF-verified bytes of a target (the orchestrator's job)."""

    def __init__(self, state: StateDir, http: HttpFetcher, repo_url: str,
                 fetch_target: Callable[[str], bytes], environ: Mapping[str, str]) -> None:
        self.state = state
        self.http = http
        self.repo_url = repo_url.rstrip("/")
        self.fetch_target = fetch_target
        self.environ = environ
        self.stats = StageStats()

    # -- local sources ---------------------------------------------------------------------

    def _installed_slots(self) -> list[Path]:
        return [s for s in (self.state.current_slot(), self.state.previous_slot())
                if s is not None and s.is_dir()]

    def _local_files(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for slot in self._installed_slots():
            try:
                manifest = load_manifest(slot)
            except IntegrityError:
                continue
            for e in manifest["files"]:
                found.setdefault(e["sha256"], slot / e["path"])
        return found

    def _index(self, sha256: str) -> ChunkIndex:
        cached = self.state.indexes / f"{sha256}.json"
        if cached.exists():
            try:
                return parse_chunk_index(cached.read_bytes(), str(cached))
            except IntegrityError:
                cached.unlink()
        data = self.fetch_target(index_target(sha256))
        index = parse_chunk_index(data, index_target(sha256))
        if index.file_sha256 != sha256:
            raise IntegrityError(f"{index_target(sha256)} indexes {index.file_sha256}")
        tmp = cached.with_name(cached.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, cached)
        return index

    def _local_chunks(self, files: dict[str, Path]) -> dict[str, tuple[Path, int, int]]:
        """chunk sha256 -> (file, offset, size) for chunks inside installed files whose
        index is saved locally (no network: an unknown index only costs delta)."""
        found: dict[str, tuple[Path, int, int]] = {}
        for sha, path in files.items():
            cached = self.state.indexes / f"{sha}.json"
            if not cached.exists():
                continue
            try:
                index = parse_chunk_index(cached.read_bytes(), str(cached))
            except IntegrityError:
                continue
            for c in index.chunks:
                found.setdefault(c.sha256, (path, c.offset, c.size))
        return found

    # -- staging ---------------------------------------------------------------------------

    def stage(self, release: Release) -> Path:
        """Assemble, verify and move ``release`` into ``slots/<version>``; return the slot.

        Raises FetchError (network, deadline), NoSpaceError, IntegrityError (a file, chunk
        or the manifest does not match what the repository signed).
        """
        slot = self.state.slot(release.version)
        if self.state.verified(slot):
            return slot
        work = self.state.staging / slot.name
        work.mkdir(parents=True, exist_ok=True)
        local_files = self._local_files()
        indexes = {f.sha256: self._index(f.sha256) for f in release.files if f.chunked}
        # Index the chunks of installed files; fetch missing indexes of installed large files
        # only if the repository still has them (cheap, and worth a lot of delta).
        for sha, path in local_files.items():
            if path.stat().st_size > 4 * 1024 * 1024 and not (
                self.state.indexes / f"{sha}.json").exists():
                try:
                    self._index(sha)
                except (FetchError, IntegrityError):
                    pass
        local_chunks = self._local_chunks(local_files)
        self._check_space(release, work, local_files, local_chunks, indexes)
        if self.http.progress is not None:
            self.http.progress.expect(self._download_estimate(release, work, local_files,
                                                              local_chunks, indexes))
        try:
            # manifest.json last, as in a build: a bundle without it is visibly unfinished.
            for f in sorted(release.files, key=lambda f: (f.path == MANIFEST_NAME, f.path)):
                self._stage_file(f, work, local_files, local_chunks, indexes)
                crash_point(f"staged-file:{f.path}", self.environ)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                shutil.rmtree(work, ignore_errors=True)
                raise NoSpaceError(
                    f"disk full while staging version {release.version}",
                    hint="free space in the state directory; the current bundle is untouched",
                ) from e
            raise
        crash_point("assembled", self.environ)
        manifest = verify_bundle(work)
        got = (manifest.get("bundle") or {}).get("version")
        if got is None or version_key(got) != version_key(release.version):
            shutil.rmtree(work, ignore_errors=True)
            raise IntegrityError(
                f"release {release.version!r} carries a bundle of version {got!r}",
                hint="the repository mixes bundles; republish it",
            )
        for d, _, _names in os.walk(work):
            fsync_dir(Path(d))
        if slot.exists():  # an unverifiable leftover of an earlier attempt
            shutil.rmtree(slot)
        os.replace(work, slot)
        fsync_dir(self.state.slots)
        return slot

    def _check_space(self, release: Release, work: Path, local_files: dict[str, Path],
                     local_chunks: dict, indexes: dict[str, ChunkIndex]) -> None:
        need = RESERVE_BYTES
        for f in release.files:
            dest = work / f.path
            if dest.exists() and dest.stat().st_size == f.size:
                continue
            need += f.size
            if f.chunked:
                need += sum(c.size for c in indexes[f.sha256].chunks
                            if c.sha256 not in local_chunks
                            and not (self.state.chunks / c.sha256).exists())
        free = shutil.disk_usage(self.state.root).free
        if free < need:
            raise NoSpaceError(
                f"staging version {release.version} needs {need} bytes, {free} are free in "
                f"{self.state.root}",
                hint="free disk space on the device; the current bundle keeps serving",
            )

    def _download_estimate(self, release: Release, work: Path, local_files: dict[str, Path],
                           local_chunks: dict, indexes: dict[str, ChunkIndex]) -> int:
        """Bytes still to come from the network (for progress and ETA in the log)."""
        total = 0
        for f in release.files:
            dest = work / f.path
            if f.sha256 in local_files or (dest.exists() and dest.stat().st_size == f.size):
                continue
            if not f.chunked:
                total += f.size
                continue
            total += sum(c.size for c in indexes[f.sha256].chunks
                         if c.sha256 not in local_chunks
                         and not (self.state.chunks / c.sha256).exists())
        return total

    def _stage_file(self, f: ReleaseFile, work: Path, local_files: dict[str, Path],
                    local_chunks: dict, indexes: dict[str, ChunkIndex]) -> None:
        dest = work / f.path
        if dest.exists() and dest.stat().st_size == f.size and _sha256_of(dest) == f.sha256:
            return  # finished by an earlier, interrupted run
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".assembling")
        src = local_files.get(f.sha256)
        if src is not None and src.stat().st_size == f.size and _sha256_of(src) == f.sha256:
            # Slots are never modified once verified, so an unchanged file (the model, in a
            # config-only update) is hard-linked: no second copy on disk, no write wear.
            tmp.unlink(missing_ok=True)
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            self.stats.bytes_local += f.size
        elif f.chunked:
            self._assemble(indexes[f.sha256], tmp, local_chunks)
        else:
            from edgepack.ota.release import blob_target

            data = self.fetch_target(blob_target(f.sha256))
            self.stats.bytes_downloaded += len(data)
            tmp.write_bytes(data)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        got = _sha256_of(tmp)
        if got != f.sha256 or tmp.stat().st_size != f.size:
            tmp.unlink()
            raise IntegrityError(f"{f.path}: assembled sha256 {got[:16]}…, signed "
                                 f"{f.sha256[:16]}…", hint="the repository will be retried")
        os.replace(tmp, dest)

    def _chunk_bytes(self, sha: str, size: int, local_chunks: dict) -> bytes:
        loc = local_chunks.get(sha)
        if loc is not None:
            path, offset, csize = loc
            with open(path, "rb") as fh:
                fh.seek(offset)
                data = fh.read(csize)
            if hashlib.sha256(data).hexdigest() == sha:
                self.stats.bytes_local += len(data)
                self.stats.chunks_local += 1
                return data
        cached = self.state.chunks / sha
        if cached.exists():
            data = cached.read_bytes()
            if hashlib.sha256(data).hexdigest() == sha:
                self.stats.chunks_local += 1
                return data
            cached.unlink()
        url = f"{self.repo_url}/{chunk_path(sha)}"
        self.http.download_to(url, cached, size)
        crash_point("chunk-downloaded", self.environ)
        data = cached.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            cached.unlink()
            raise IntegrityError(
                f"chunk {sha[:16]}… from {url} does not match its signed index",
                hint="the repository or a proxy serves a tampered file; it was rejected",
            )
        self.stats.bytes_downloaded += len(data)
        self.stats.chunks_downloaded += 1
        return data

    def _assemble(self, index: ChunkIndex, tmp: Path, local_chunks: dict) -> None:
        with open(tmp, "wb") as out:
            for c in index.chunks:
                out.write(self._chunk_bytes(c.sha256, c.size, local_chunks))
            out.flush()
            os.fsync(out.fileno())
