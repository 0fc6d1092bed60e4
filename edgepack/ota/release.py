"""The update repository's documents, as both the publisher and the device agent read them.

Device side: standard library and ``edgepack.errors`` only. The publisher (``edgepack.ota.repo``,
build side) writes these documents; the agent (``edgepack.ota.agent``) reads them, so the format
lives here where both may import it.

Repository layout (``DIR`` is what ``edgepack repo init`` creates)::

    DIR/keys/                 signing keys, 0600 -- never served
    DIR/public/               serve this folder (nginx, S3, a CDN)
        metadata/             TUF metadata: root, timestamp, <v>.snapshot, <v>.targets
        targets/              TUF targets, stored as <sha256>.<basename> (consistent snapshots)
            channels/         channels/<channel>.json: the releases of a channel
            releases/         releases/<channel>/<version>.json: one bundle version's file list
            blobs/            blobs/<sha256>: bundle files below the chunking threshold
            indexes/          indexes/<sha256>.json: chunk index of one large file
        chunks/<sha256>       chunks of large files, named by their sha256 (verified through
                              the signed chunk index, so not TUF targets themselves)

TUF signs channel and release documents, small files and chunk indexes (length + sha256 in
targets.json); a chunk is trusted because its sha256 is listed in a signed index.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from edgepack.errors import IntegrityError, UsageError
from edgepack.manifest import parse_bundle_version

DOC_SCHEMA = 1
CHANNEL_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


# --- bundle versions -------------------------------------------------------------------------


def version_key(version: int | str) -> tuple[int, ...]:
    """A sort key for a bundle version (``manifest.parse_bundle_version``, padded to three
    parts so that 3 and "3.0.0" are equal). Raises IntegrityError for a malformed version."""
    parts = parse_bundle_version(version)
    return parts + (0,) * (3 - len(parts))


def version_text(version: int | str) -> str:
    """The version as a file-name-safe string (validated through ``version_key``)."""
    version_key(version)
    return str(version)


def is_newer(candidate: int | str, installed: int | str | None) -> bool:
    """Whether ``candidate`` is strictly newer than ``installed`` (None = nothing installed)."""
    return installed is None or version_key(candidate) > version_key(installed)


# --- rollout ---------------------------------------------------------------------------------


def rollout_bucket(device_id: str) -> float:
    """The device's stable place in [0, 100): the same id always lands in the same place.

    The bucket does not depend on the release, so raising a rollout from 10 % to 50 % keeps
    the first 10 % of devices and adds more (a fixed canary cohort), like Chrome's and
    Mender's phased rollouts.
    """
    digest = hashlib.sha256(device_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 10000 / 100.0


def rollout_covers(percent: int | float, device_id: str) -> bool:
    """Whether a release rolled out to ``percent`` % of devices includes this device."""
    return rollout_bucket(device_id) < percent


GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")


def check_group(name: str) -> str:
    """Validate a device group name or device id used in a rollout's ``groups`` list."""
    if not GROUP_RE.match(name or ""):
        raise UsageError(
            f"group {name!r} is not a valid group name or device id",
            hint="use letters, digits, '.', '_', ':', '@' or '-' (at most 128 characters)",
        )
    return name


def offered_to(meta: dict[str, Any], device_id: str, groups: tuple[str, ...] = ()
               ) -> tuple[bool, str]:
    """Whether a release (its signed ``custom.edgepack`` fields) is offered to this device,
    and why not.

    A release reaches a device named in its ``groups`` list (by device id or by one of the
    groups the agent runs with, ``agent run --group``) **or** whose cohort falls inside its
    rollout percentage: ``--percent 0 --group canary`` reaches the canaries only,
    ``--percent 10 --group lab`` the lab plus 10 % of everyone.
    """
    named = [str(g) for g in meta.get("groups") or []]
    if device_id in named or any(g in named for g in groups):
        return True, "named in the rollout's groups"
    percent = float(meta.get("rollout", 0))
    if rollout_covers(percent, device_id):
        return True, f"cohort {rollout_bucket(device_id):.2f} < rollout {percent:g}%"
    why = (f"rollout {percent:g}% does not include this device (cohort "
           f"{rollout_bucket(device_id):.2f})")
    if named:
        why += f" and its groups {named} name neither this device nor its groups " \
               f"{list(groups) or '[]'}"
    return False, why


def check_rollout(percent: object) -> int:
    """Validate a rollout percentage: an integer 0..100 (TUF's canonical JSON has no
    floats). Raises UsageError otherwise."""
    if isinstance(percent, float) and percent.is_integer():
        percent = int(percent)
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
        raise UsageError(f"rollout {percent!r} is not a whole percentage",
                         hint="use an integer from 0 to 100")
    return percent


def check_channel(name: str) -> str:
    """Validate a channel name (lower-case letters, digits, '.', '_', '-')."""
    if not CHANNEL_RE.match(name or ""):
        raise UsageError(
            f"channel {name!r} is not a valid name",
            hint="use lower-case letters, digits, '.', '_' or '-' (e.g. stable, beta)",
        )
    return name


# --- documents -------------------------------------------------------------------------------


def channel_target(channel: str) -> str:
    return f"channels/{channel}.json"


def release_target(channel: str, version: int | str) -> str:
    return f"releases/{channel}/{version_text(version)}.json"


def sbom_target(channel: str, version: int | str) -> str:
    """The version's ML-BOM, published beside it for auditors (not fetched by devices)."""
    return f"sboms/{channel}/{version_text(version)}.cdx.json"


def provenance_target(channel: str, version: int | str) -> str:
    """The version's signed provenance (``edgepack sign``), when the bundle carries one."""
    return f"provenance/{channel}/{version_text(version)}.intoto.jsonl"


def blob_target(sha256: str) -> str:
    return f"blobs/{sha256}"


def index_target(sha256: str) -> str:
    return f"indexes/{sha256}.json"


def chunk_path(sha256: str) -> str:
    """A chunk's path under the served root (beside metadata/ and targets/)."""
    return f"chunks/{sha256}"


def stored_target_path(target_path: str, sha256: str) -> str:
    """Where a TUF target lies under targets/: ``dir/<sha256>.<basename>`` (consistent
    snapshots, the same rule as ngclient's ``prefix_targets_with_hash``)."""
    dirname, sep, basename = target_path.rpartition("/")
    return f"{dirname}{sep}{sha256}.{basename}"


@dataclass(frozen=True)
class ReleaseFile:
    """One bundle file in a release: where it goes and how it is fetched."""

    path: str
    sha256: str
    size: int
    chunked: bool  # True: assemble from chunks via index_target(sha256); else blob_target


@dataclass(frozen=True)
class Release:
    """One bundle version published to a channel."""

    channel: str
    version: int | str
    bundle: str
    files: tuple[ReleaseFile, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": DOC_SCHEMA,
            "type": "edgepack-release",
            "channel": self.channel,
            "version": self.version,
            "bundle": self.bundle,
            "files": [
                {"path": f.path, "sha256": f.sha256, "size": f.size, "chunked": f.chunked}
                for f in self.files
            ],
        }


@dataclass(frozen=True)
class Chunk:
    sha256: str
    offset: int
    size: int


@dataclass(frozen=True)
class ChunkIndex:
    """The content-defined chunks of one large file, in order."""

    file_sha256: str
    size: int
    chunker: dict[str, Any]
    chunks: tuple[Chunk, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": DOC_SCHEMA,
            "type": "edgepack-chunk-index",
            "file_sha256": self.file_sha256,
            "size": self.size,
            "chunker": self.chunker,
            "chunks": [[c.sha256, c.size] for c in self.chunks],
        }


def _doc(data: bytes, kind: str, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{where}: not JSON ({e})", hint="republish it") from e
    if not isinstance(doc, dict) or doc.get("type") != kind or doc.get("schema") != DOC_SCHEMA:
        raise IntegrityError(
            f"{where}: expected a schema-{DOC_SCHEMA} {kind} document",
            hint="the repository was written by another edgepack version; republish it",
        )
    return doc


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _safe_relpath(path: Any, where: str) -> str:
    if (
        not isinstance(path, str)
        or not path
        or path.startswith("/")
        or "\\" in path
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise IntegrityError(f"{where}: file path {path!r} escapes the bundle")
    return path


def parse_release(data: bytes, where: str) -> Release:
    """Parse a release document; raises IntegrityError if it is malformed."""
    doc = _doc(data, "edgepack-release", where)
    try:
        files = tuple(
            ReleaseFile(
                _safe_relpath(f["path"], where),
                str(f["sha256"]),
                int(f["size"]),
                bool(f["chunked"]),
            )
            for f in doc["files"]
        )
        version_key(doc["version"])
        release = Release(str(doc["channel"]), doc["version"], str(doc["bundle"]), files)
    except (KeyError, TypeError, ValueError, IntegrityError) as e:
        raise IntegrityError(f"{where}: malformed release document ({e})") from e
    if not all(_HEX64.match(f.sha256) and f.size >= 0 for f in files):
        raise IntegrityError(f"{where}: a file has a malformed sha256 or size")
    return release


def parse_chunk_index(data: bytes, where: str) -> ChunkIndex:
    """Parse a chunk index; raises IntegrityError unless its chunks tile the file exactly."""
    doc = _doc(data, "edgepack-chunk-index", where)
    try:
        chunks = []
        offset = 0
        for sha, size in doc["chunks"]:
            if not _HEX64.match(sha) or int(size) <= 0:
                raise ValueError(f"bad chunk {sha!r} {size!r}")
            chunks.append(Chunk(sha, offset, int(size)))
            offset += int(size)
        index = ChunkIndex(str(doc["file_sha256"]), int(doc["size"]), dict(doc["chunker"]),
                           tuple(chunks))
    except (KeyError, TypeError, ValueError) as e:
        raise IntegrityError(f"{where}: malformed chunk index ({e})") from e
    if offset != index.size:
        raise IntegrityError(
            f"{where}: chunks add up to {offset} bytes, the file has {index.size}"
        )
    return index


@dataclass(frozen=True)
class Channel:
    """A channel document: its versions, and the signed permission to go back.

    ``rollback_to`` is set by ``repo rollback``: the one lower version a device running a
    newer one may install. Without it an agent never installs a lower version. ``withdrawn``
    lists versions taken off the channel by a rollback; they stay burnt (a later publish must
    be newer than them too, so no device sees the same version number with other bytes).
    """

    versions: tuple[int | str, ...]
    rollback_to: int | str | None = None
    withdrawn: tuple[int | str, ...] = ()


def parse_channel_doc(data: bytes, where: str) -> Channel:
    """Parse a channel document; raises IntegrityError if it is malformed."""
    doc = _doc(data, "edgepack-channel", where)
    try:
        versions = tuple(doc["versions"])
        withdrawn = tuple(doc.get("withdrawn") or ())
        for v in (*versions, *withdrawn):
            version_key(v)
        rollback_to = doc.get("rollback_to")
        if rollback_to is not None:
            version_key(rollback_to)
            if not any(version_key(v) == version_key(rollback_to) for v in versions):
                raise ValueError(f"rollback_to {rollback_to!r} is not one of its versions")
    except (KeyError, TypeError, ValueError, IntegrityError) as e:
        raise IntegrityError(f"{where}: malformed channel document ({e})") from e
    return Channel(versions, rollback_to, withdrawn)


def parse_channel(data: bytes, where: str) -> list[int | str]:
    """Parse a channel document; return its versions (any order)."""
    return list(parse_channel_doc(data, where).versions)


def channel_doc(channel: str, versions: list[int | str], *,
                rollback_to: int | str | None = None,
                withdrawn: list[int | str] | tuple[int | str, ...] = ()) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": DOC_SCHEMA,
        "type": "edgepack-channel",
        "channel": channel,
        "versions": sorted(versions, key=version_key),
    }
    # Only written when set, so a channel without a rollback is byte-identical to before.
    if rollback_to is not None:
        doc["rollback_to"] = rollback_to
    if withdrawn:
        doc["withdrawn"] = sorted(withdrawn, key=version_key)
    return doc
