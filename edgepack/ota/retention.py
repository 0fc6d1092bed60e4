"""Repository retention: keep the newest versions of each channel, delete what nothing uses.

``edgepack repo gc DIR --keep N`` (build side, like ``edgepack.ota.repo``):

1. per channel, keep the newest N versions -- and the newest version rolled out to 100 %,
   so devices outside a canary cohort can still install something -- and drop the other
   release documents from the channel and from targets metadata;
2. drop targets entries for blobs and chunk indexes that no kept release lists;
3. re-sign targets, snapshot and timestamp (timestamp last, as a publish does);
4. delete stored target files no longer in targets metadata, chunks no kept index lists, and
   versioned snapshot/targets metadata older than the previous version. Root metadata is
   never deleted: devices walk the N.root.json chain to rotate keys.

An agent that was downloading a dropped version when gc ran gets 404s for that cycle
(a FetchError, nothing installed) and picks the newest kept version on its next refresh.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.errors import UsageError
from edgepack.manifest import canonical_json
from edgepack.ota.release import (
    Channel,
    blob_target,
    channel_doc,
    channel_target,
    index_target,
    parse_channel_doc,
    parse_chunk_index,
    parse_release,
    provenance_target,
    release_target,
    sbom_target,
    stored_target_path,
    version_key,
    version_text,
)
from edgepack.ota.repo import Expiry, Repository

_VERSIONED_MD = re.compile(r"^(\d+)\.(snapshot|targets)\.json$")


@dataclass
class GcResult:
    dropped_versions: dict[str, list[int | str]] = field(default_factory=dict)
    kept_versions: dict[str, list[int | str]] = field(default_factory=dict)
    files_deleted: int = 0
    chunks_deleted: int = 0
    metadata_deleted: int = 0
    bytes_freed: int = 0
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _rollout(info) -> int | None:
    custom = (info.unrecognized_fields.get("custom") or {}) if info else {}
    value = (custom.get("edgepack") or {}).get("rollout")
    return value if isinstance(value, int) else None


def _kept(repo: Repository, targets, channel: str, keep: int) -> tuple[list, list, Channel]:
    """(kept, dropped) versions of ``channel``, each oldest first, and its document.

    A channel's rollback target always stays (devices are being sent back to it), and the
    versions a rollback withdrew are dropped (no device is offered them any more)."""
    data = repo._read_target(targets, channel_target(channel))
    doc = parse_channel_doc(data, channel_target(channel)) if data else Channel(())
    versions = list(doc.versions)
    newest_first = sorted(versions, key=version_key, reverse=True)
    keep_text = {version_text(v) for v in newest_first[:keep]}
    if doc.rollback_to is not None:
        keep_text.add(version_text(doc.rollback_to))
    for v in newest_first:
        if _rollout(targets.signed.targets.get(release_target(channel, v))) == 100:
            keep_text.add(version_text(v))
            break
    kept = [v for v in versions if version_text(v) in keep_text]
    dropped = [v for v in versions if version_text(v) not in keep_text]
    dropped += [v for v in doc.withdrawn
                if release_target(channel, v) in targets.signed.targets]
    return kept, dropped, doc


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def collect_garbage(repo: Repository, keep: int, *, dry_run: bool = False,
                    expiry: Expiry | None = None) -> GcResult:
    """Apply the retention described in the module docstring; return what went.

    Raises UsageError for ``keep`` < 1 (the newest version of a channel always stays, so
    an older one can never be re-published over it), ConfigError/IntegrityError for a
    folder that is not a readable repository.
    """
    if keep < 1:
        raise UsageError(f"--keep {keep} must be at least 1",
                         hint="the newest version of every channel always stays")
    result = GcResult(dry_run=dry_run)
    with repo._locked():
        timestamp, snapshot, targets = repo._current()
        table = targets.signed.targets
        channels = sorted(p[len("channels/"):-len(".json")] for p in table
                          if p.startswith("channels/") and p.endswith(".json"))
        new_channel_docs: dict[str, bytes] = {}
        for ch in channels:
            kept, dropped, chan = _kept(repo, targets, ch, keep)
            result.kept_versions[ch] = kept
            if dropped:
                result.dropped_versions[ch] = dropped
                new_channel_docs[ch] = canonical_json(channel_doc(
                    ch, kept, rollback_to=chan.rollback_to, withdrawn=chan.withdrawn))
        dropped_paths = {target(ch, v) for ch, vs in result.dropped_versions.items()
                         for v in vs for target in (release_target, sbom_target,
                                                    provenance_target)}
        # What the kept releases use: their small files (blobs) and chunk indexes.
        used: set[str] = set()
        for path, _info in table.items():
            if path.startswith("releases/") and path not in dropped_paths:
                release = parse_release(repo._read_target(targets, path) or b"", path)
                for f in release.files:
                    used.add(index_target(f.sha256) if f.chunked else blob_target(f.sha256))
        dropped_paths |= {p for p in table
                          if p.startswith(("blobs/", "indexes/")) and p not in used}
        live_chunks: set[str] = set()
        for path in sorted(used):
            if path.startswith("indexes/"):
                index = parse_chunk_index(repo._read_target(targets, path) or b"", path)
                live_chunks.update(c.sha256 for c in index.chunks)
        if dry_run:
            return _count_deletions(repo, snapshot, targets, dropped_paths, live_chunks,
                                    result, delete=False)
        if dropped_paths:
            for path in dropped_paths:
                table.pop(path, None)
            for ch, doc in new_channel_docs.items():
                repo._add_target(targets, channel_target(ch), doc)
            repo._sign_and_write(timestamp, snapshot, targets, expiry or repo.expiry())
        return _count_deletions(repo, snapshot, targets, set(), live_chunks, result,
                                delete=True)


def _count_deletions(repo: Repository, snapshot, targets, dropped_paths: set[str],
                     live_chunks: set[str], result: GcResult, *, delete: bool) -> GcResult:
    table = targets.signed.targets
    live_files = {stored_target_path(p, info.hashes["sha256"])
                  for p, info in table.items() if p not in dropped_paths}

    def remove(path: Path) -> None:
        result.bytes_freed += _size(path)
        if delete:
            path.unlink(missing_ok=True)

    for f in sorted(repo.targets.rglob("*")):
        if f.is_file() and not f.name.startswith(".") and \
                f.relative_to(repo.targets).as_posix() not in live_files:
            remove(f)
            result.files_deleted += 1
    chunks = repo.public / "chunks"
    for c in sorted(chunks.iterdir()) if chunks.is_dir() else []:
        if c.is_file() and not c.name.startswith(".") and c.name not in live_chunks:
            remove(c)
            result.chunks_deleted += 1
    # Versioned metadata: keep the current and the previous snapshot/targets (an agent
    # mid-refresh may still ask for the one before this gc's re-sign).
    current = {"snapshot": snapshot.signed.version, "targets": targets.signed.version}
    for m in sorted(repo.metadata.iterdir()):
        match = _VERSIONED_MD.match(m.name)
        if match and int(match.group(1)) < int(current[match.group(2)]) - 1:
            remove(m)
            result.metadata_deleted += 1
    return result
