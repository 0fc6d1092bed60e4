"""The one reader of bundle archives (``build --archive`` output): check, read, extract.

A bundle archive is an uncompressed tar holding one folder, the bundle, with ``manifest.json``
last. Every command that accepts ``BUNDLE.tar`` (``install``, ``verify``, ``inspect``) goes
through this module, which refuses anything a bundle cannot contain before a byte is written:

- only regular files and directories: no symlinks, hard links, devices, FIFOs;
- only relative paths inside the one top-level folder: no absolute path, no ``..``, no
  duplicate member;
- bounded: at most ``MAX_MEMBERS`` members and ``max_bytes`` bytes in all (default 256 GiB,
  ``EDGEPACK_MAX_ARCHIVE_BYTES`` overrides), and never more than the destination has free.

A refused archive raises IntegrityError (exit 6). Extraction writes into a hidden
``.*.partial-*`` folder beside the destination, verifies the bundle there against its manifest,
and only then renames it into place: an interrupted extraction never looks complete.
Python's own ``tarfile`` extraction filters (PEP 706) are not relied on: members are copied by
hand, so no tar feature other than file bytes reaches the disk.

Device side: standard library and edgepack.errors/manifest only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from edgepack.errors import IntegrityError
from edgepack.manifest import MANIFEST_NAME, SIGNATURE_NAME, load_manifest, verify_bundle

MAX_MEMBERS = 100_000
DEFAULT_MAX_BYTES = 256 << 30
_CHUNK = 1 << 20


def is_archive(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file to read as a bundle archive (a folder is a bundle itself)."""
    return Path(path).is_file()


def max_archive_bytes(environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    text = env.get("EDGEPACK_MAX_ARCHIVE_BYTES", "")
    if not text:
        return DEFAULT_MAX_BYTES
    if not text.isdigit() or int(text) <= 0:
        raise IntegrityError(
            f"EDGEPACK_MAX_ARCHIVE_BYTES={text!r} is not a positive number of bytes",
            hint="unset it or give a byte count, e.g. 68719476736 for 64 GiB",
        )
    return int(text)


@dataclass(frozen=True)
class ArchiveListing:
    """The checked contents of a bundle archive."""

    path: Path
    top: str  # the bundle folder's name inside the archive
    files: dict[str, tarfile.TarInfo]  # bundle-relative POSIX path -> member
    dirs: tuple[str, ...]
    total_bytes: int


def _refuse(archive: Path, what: str) -> IntegrityError:
    return IntegrityError(
        f"archive {str(archive)!r} refused: {what}",
        hint="a bundle archive holds one folder of regular files (what `edgepack build "
        "--archive` writes); rebuild it or copy it again, and do not unpack it by hand",
    )


def scan_archive(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> ArchiveListing:
    """Read every member header of a bundle archive and check it; return the listing.

    Raises IntegrityError for a file that is not a tar, a link or special file, a path that
    is absolute, climbs out with ``..``, lies outside the one top folder or repeats, and for
    more members or bytes than allowed.
    """
    archive = Path(path)
    limit = max_archive_bytes() if max_bytes is None else max_bytes
    files: dict[str, tarfile.TarInfo] = {}
    dirs: list[str] = []
    top: str | None = None
    total = 0
    try:
        with tarfile.open(archive, "r:") as tar:
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise _refuse(archive, f"more than {MAX_MEMBERS} members")
                name = member.name
                pure = PurePosixPath(name)
                if name.startswith("/") or pure.is_absolute():
                    raise _refuse(archive, f"member {name!r} has an absolute path")
                if any(part == ".." for part in pure.parts) or "\\" in name:
                    raise _refuse(archive, f"member {name!r} climbs out of the bundle")
                if not (member.isfile() or member.isdir()):
                    kind = "link" if (member.issym() or member.islnk()) else "special file"
                    raise _refuse(archive, f"member {name!r} is a {kind}; only regular "
                                  "files and folders are allowed")
                parts = [p for p in pure.parts if p != "."]
                if not parts:
                    continue
                if top is None:
                    top = parts[0]
                elif parts[0] != top:
                    raise _refuse(archive, f"member {name!r} lies outside the bundle folder "
                                  f"{top!r}")
                rel = "/".join(parts[1:])
                if member.isdir():
                    if rel:
                        dirs.append(rel)
                    continue
                if not rel:
                    raise _refuse(archive, f"member {name!r} is a file, expected a folder")
                if rel in files:
                    raise _refuse(archive, f"member {name!r} appears twice")
                total += member.size
                if total > limit:
                    raise _refuse(archive, f"more than {limit} bytes of files (the limit; "
                                  "raise EDGEPACK_MAX_ARCHIVE_BYTES for a larger bundle)")
                files[rel] = member
    except (tarfile.TarError, OSError, EOFError) as e:
        raise IntegrityError(
            f"{str(archive)!r} is not a readable tar archive: {e}",
            hint="pass a bundle folder or the .tar that `edgepack build --archive` wrote",
        ) from e
    if top is None or MANIFEST_NAME not in files:
        raise IntegrityError(
            f"archive {str(archive)!r} holds no {top or 'bundle'}/{MANIFEST_NAME}",
            hint="the manifest is written last, so this archive is incomplete or not a bundle",
        )
    return ArchiveListing(archive, top, files, tuple(dirs), total)


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dst: Path,
                 digest: Any | None = None) -> None:
    src = tar.extractfile(member)
    if src is None:  # pragma: no cover - scan_archive admits regular files only
        raise IntegrityError(f"cannot read member {member.name!r}")
    with src, open(dst, "xb") as out:
        remaining = member.size
        while remaining > 0:
            block = src.read(min(_CHUNK, remaining))
            if not block:
                raise IntegrityError(f"member {member.name!r} is truncated")
            remaining -= len(block)
            out.write(block)
            if digest is not None:
                digest.update(block)


def read_archive_manifest(listing: ArchiveListing) -> dict[str, Any]:
    """The archive's manifest, checked as ``load_manifest`` checks a folder's."""
    with tempfile.TemporaryDirectory(prefix="edgepack-manifest-") as tmp, \
            tarfile.open(listing.path, "r:") as tar:
        _copy_member(tar, listing.files[MANIFEST_NAME], Path(tmp) / MANIFEST_NAME)
        return load_manifest(tmp)


def verify_archive(listing: ArchiveListing) -> dict[str, Any]:
    """Hash every member against the archive's manifest without unpacking; return it.

    Raises IntegrityError naming each missing, resized, altered or unlisted file, as
    ``verify_bundle`` does for a folder.
    """
    manifest = read_archive_manifest(listing)
    problems: list[str] = []
    listed = {e["path"]: e for e in manifest["files"]}
    with tarfile.open(listing.path, "r:") as tar:
        for rel, entry in sorted(listed.items()):
            member = listing.files.get(rel)
            if member is None:
                problems.append(f"{rel}: missing")
                continue
            if member.size != entry["size"]:
                problems.append(f"{rel}: size {member.size}, expected {entry['size']}")
                continue
            src = tar.extractfile(member)
            h = hashlib.sha256()
            assert src is not None  # regular file, checked by scan_archive
            with src:
                while block := src.read(_CHUNK):
                    h.update(block)
            if h.hexdigest() != entry["sha256"]:
                problems.append(f"{rel}: sha256 {h.hexdigest()[:16]}…, expected "
                                f"{entry['sha256'][:16]}…")
    problems += [f"{rel}: not listed in the manifest" for rel in sorted(listing.files)
                 if rel not in (MANIFEST_NAME, SIGNATURE_NAME) and rel not in listed]
    if problems:
        raise IntegrityError(
            f"archive {str(listing.path)!r} does not match its manifest:\n    "
            + "\n    ".join(problems),
            hint="the archive was altered or damaged; rebuild it or copy it again",
        )
    return manifest


def extract_archive(listing: ArchiveListing, dest: Path) -> Path:
    """Unpack a checked archive to ``dest`` (which must not exist) and verify it there.

    Writes into a hidden partial folder beside ``dest`` and renames it only once every file
    matched the manifest. Raises IntegrityError (bad archive, not enough space, mismatch).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest.parent).free
    if listing.total_bytes > free:
        raise IntegrityError(
            f"archive {str(listing.path)!r} needs {listing.total_bytes} bytes, "
            f"{str(dest.parent)!r} has {free} free",
            hint="free disk space and retry; nothing was unpacked",
        )
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        for rel in sorted(listing.dirs):
            (work / rel).mkdir(parents=True, exist_ok=True)
        with tarfile.open(listing.path, "r:") as tar:
            # The manifest last, as in the archive, so a cut-short copy has none.
            for rel in sorted(listing.files, key=lambda r: (r == MANIFEST_NAME, r)):
                target = work / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                _copy_member(tar, listing.files[rel], target)
        verify_bundle(work)
        os.replace(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dest
