"""The bundle manifest: read it, hash files, verify a bundle against it.

Device side: this module imports only the standard library and ``edgepack.errors``.

A bundle is a directory::

    manifest.json   written last; lists every other file with sha256 and size
    provenance.intoto.jsonl   only when signed (``edgepack sign``): covers manifest.json
    model/          the GGUF file, or the ONNX graph(s) + external data
    tokenizer/      tokenizer.json etc. (ONNX), chat template
    server.toml     engine settings chosen by the plan
    systemd/        edgepack-server.service, edgepack-agent.service

``manifest.json`` is canonical JSON (sorted keys, two-space indent, trailing newline) so the
same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import IntegrityError

MANIFEST_NAME = "manifest.json"
# Written after the manifest by `edgepack sign` (edgepack.signature), so it cannot be listed in
# it; the signature covers the manifest instead.
SIGNATURE_NAME = "provenance.intoto.jsonl"
# The bundle's CycloneDX ML-BOM (written by edgepack.build.sbom, listed in the manifest).
SBOM_NAME = "sbom.cdx.json"
SCHEMA_VERSION = 1
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def canonical_json(data: Any) -> bytes:
    """The one byte form edgepack writes JSON in: sorted keys, indent 2, newline."""
    return (json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "size": self.size}


def describe_files(root: Path, relpaths: Iterable[str]) -> list[FileEntry]:
    """Hash each file under ``root`` (POSIX relative paths), sorted by path."""
    entries = []
    for rel in sorted(set(relpaths)):
        p = root / rel
        entries.append(FileEntry(rel, sha256_file(p), p.stat().st_size))
    return entries


def _regular_file_problem(root: Path, rel: str) -> str | None:
    """Why ``root/rel`` is not a plain file reached through plain directories (or None)."""
    p = root
    parts = Path(rel).parts
    for i, part in enumerate(parts):
        p = p / part
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return "missing"
        except OSError as e:
            return f"cannot be read: {e.strerror or e}"
        where = "/".join(parts[: i + 1])
        if stat.S_ISLNK(st.st_mode):
            return f"{where} is a symbolic link (bundles hold regular files only)"
        last = i == len(parts) - 1
        if not last and not stat.S_ISDIR(st.st_mode):
            return f"{where} is not a directory"
        if last and not stat.S_ISREG(st.st_mode):
            return f"{where} is not a regular file ({_kind(st.st_mode)})"
    return None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "an unusual file"


def open_regular(root: Path, rel: str) -> int:
    """Open ``root/rel`` read-only without following any link inside the bundle.

    Each directory is opened relative to the one before with ``O_NOFOLLOW``, so a link swapped
    in between the check and the open cannot redirect the read. Returns the descriptor;
    raises IntegrityError when any part is a link or the file is not a regular file.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    dir_flags = flags | getattr(os, "O_DIRECTORY", 0)
    parts = Path(rel).parts
    fd = os.open(root, dir_flags & ~getattr(os, "O_NOFOLLOW", 0))  # the root may be a link
    try:
        for part in parts[:-1]:
            nxt = os.open(part, dir_flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
        file_fd = os.open(parts[-1], flags, dir_fd=fd)
    except OSError as e:
        raise IntegrityError(f"{rel}: {_regular_file_problem(root, rel) or e}") from e
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(file_fd).st_mode):
        os.close(file_fd)
        raise IntegrityError(f"{rel}: not a regular file")
    return file_fd


def sha256_fd(fd: int) -> tuple[str, int]:
    """Hex sha256 and byte count of an open file, read from offset 0 (the offset is kept)."""
    h = hashlib.sha256()
    offset = 0
    while block := os.pread(fd, _CHUNK, offset):
        h.update(block)
        offset += len(block)
    return h.hexdigest(), offset


@dataclass(frozen=True)
class HeldFile:
    """A bundle file verified through a descriptor that stays open.

    Loading from ``open_path`` reads the very bytes that were hashed, whatever happens to
    the name in the bundle afterwards (a swap between verify and load cannot pass).
    """

    path: str
    fd: int
    sha256: str
    size: int

    @property
    def open_path(self) -> str:
        """A path that opens this descriptor's file: ``/proc/self/fd/N`` (Linux)."""
        return f"/proc/self/fd/{self.fd}"

    def read_bytes(self) -> bytes:
        data, offset = bytearray(), 0
        while block := os.pread(self.fd, _CHUNK, offset):
            data += block
            offset += len(block)
        return bytes(data)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")


def load_manifest(bundle_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and sanity-check ``manifest.json``.

    Raises IntegrityError when it is missing, a link or not a regular file, not JSON, of an
    unknown schema, or lacks a well-typed file list: a bundle without a whole manifest is an
    unfinished (or forged) one.
    """
    return load_manifest_and_digest(bundle_dir)[0]


def load_manifest_and_digest(bundle_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """``load_manifest``, with the sha256 of the very bytes that were parsed (one read, through
    a descriptor opened without following links): what a signature over the manifest covers.
    """
    root = Path(bundle_dir)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise IntegrityError(
            f"bundle {str(root)!r} is not a directory",
            hint="pass the folder that `edgepack build` wrote (it holds manifest.json)",
        )
    problem = _regular_file_problem(root, MANIFEST_NAME)
    if problem == "missing":
        raise IntegrityError(
            f"bundle {str(root)!r} has no {MANIFEST_NAME}",
            hint="the manifest is written last, so this bundle is incomplete (an interrupted "
            "build or copy?); rebuild it or copy it again",
        )
    if problem:
        raise IntegrityError(f"bundle {str(root)!r}: {problem}",
                             hint="rebuild the bundle or copy it again (without links)")
    try:
        fd = open_regular(root, MANIFEST_NAME)
        try:
            raw = HeldFile(MANIFEST_NAME, fd, "", 0).read_bytes()
        finally:
            os.close(fd)
        digest = hashlib.sha256(raw).hexdigest()
        data = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise IntegrityError(
            f"{path} is not valid JSON: {e}", hint="rebuild the bundle or copy it again"
        ) from e
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
        got = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise IntegrityError(
            f"{path}: manifest schema {got!r}, expected {SCHEMA_VERSION}",
            hint="use the edgepack version that built this bundle, or rebuild it",
        )
    files = data.get("files")
    if not isinstance(files, list) or not all(
        isinstance(f, dict) and {"path", "sha256", "size"} <= f.keys() for f in files
    ):
        raise IntegrityError(
            f"{path}: 'files' must be a list of {{path, sha256, size}}",
            hint="rebuild the bundle",
        )
    problems = [p for i, f in enumerate(files) if (p := _entry_problem(i, f))]
    seen: set[str] = set()
    for f in files:
        if isinstance(f["path"], str) and f["path"] in seen:
            problems.append(f"files: {f['path']!r} is listed twice")
        seen.add(f["path"] if isinstance(f["path"], str) else "")
    if problems:
        raise IntegrityError(f"{path}: malformed file list:\n    " + "\n    ".join(problems),
                             hint="the manifest was damaged or forged; rebuild the bundle")
    return data, digest


_HEX = frozenset("0123456789abcdef")


def _entry_problem(i: int, f: dict[str, Any]) -> str | None:
    path, digest, size = f["path"], f["sha256"], f["size"]
    if not isinstance(path, str) or not path:
        return f"files[{i}].path = {path!r}, expected a relative path (string)"
    p = Path(path)
    if p.is_absolute() or ".." in p.parts or "\\" in path or p.as_posix() != path:
        return f"files[{i}].path = {path!r} escapes the bundle or is not a plain relative path"
    if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
        return f"files[{i}] ({path}): sha256 = {digest!r}, expected 64 lowercase hex digits"
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        return f"files[{i}] ({path}): size = {size!r}, expected a non-negative integer"
    return None


def verify_bundle(
    bundle_dir: str | os.PathLike[str], *, check_extra: bool = True
) -> dict[str, Any]:
    """Check every file of a bundle against its manifest; return the manifest.

    Raises IntegrityError naming each missing, resized, altered, linked, non-regular or (with
    ``check_extra``) unlisted file.
    """
    manifest, _ = verify_and_hold(bundle_dir, (), check_extra=check_extra)
    return manifest


def verify_and_hold(
    bundle_dir: str | os.PathLike[str], hold: Iterable[str], *, check_extra: bool = True,
    hold_under: tuple[str, ...] = (), manifest_sha256: str | None = None,
) -> tuple[dict[str, Any], dict[str, HeldFile]]:
    """``verify_bundle``, keeping open the files named in ``hold`` and every listed file whose
    path starts with one of ``hold_under`` (e.g. ``"model/"``; see HeldFile).

    Each file is hashed once, through the descriptor it is opened with; the caller owns the
    returned descriptors (they live as long as the server that loads from them). With
    ``manifest_sha256`` (the digest a signature covers), the manifest read here must have it,
    so a manifest swapped after the signature was checked is refused, not trusted.
    """
    root = Path(bundle_dir)
    manifest, digest = load_manifest_and_digest(root)
    if manifest_sha256 is not None and digest != manifest_sha256:
        raise IntegrityError(
            f"bundle {str(root)!r}: {MANIFEST_NAME} has sha256 {digest[:16]}…, but the signed "
            f"statement covers {manifest_sha256[:16]}…: the manifest changed after its "
            "signature was checked",
            hint="do not serve this bundle; get it again from its builder")
    keep = set(hold) | {f["path"] for f in manifest["files"] if f["path"].startswith(hold_under)}
    held: dict[str, HeldFile] = {}
    problems: list[str] = []
    listed = set()
    try:
        for entry in manifest["files"]:
            rel = entry["path"]
            listed.add(rel)
            problem = _regular_file_problem(root, rel)
            if problem:
                problems.append(f"{rel}: {problem}")
                continue
            try:
                fd = open_regular(root, rel)
            except IntegrityError as e:
                problems.append(e.message)
                continue
            try:
                size = os.fstat(fd).st_size
                if size != entry["size"]:
                    problems.append(f"{rel}: size {size}, expected {entry['size']}")
                    continue
                digest, read = sha256_fd(fd)
                if digest != entry["sha256"] or read != size:
                    problems.append(
                        f"{rel}: sha256 {digest[:16]}…, expected {entry['sha256'][:16]}…")
                    continue
                if rel in keep:
                    held[rel] = HeldFile(rel, fd, digest, size)
                    fd = -1
            finally:
                if fd >= 0:
                    os.close(fd)
        if check_extra:
            problems += _unlisted(root, listed)
        missing = keep - held.keys() - listed
        problems += [f"{rel}: not listed in the manifest" for rel in sorted(missing)]
        if problems:
            raise IntegrityError(
                f"bundle {str(root)!r} does not match its manifest:\n    "
                + "\n    ".join(problems),
                hint="the bundle was altered or damaged; rebuild it or fetch it again",
            )
    except BaseException:
        for h in held.values():
            os.close(h.fd)
        raise
    return manifest, held


def _unlisted(root: Path, listed: set[str]) -> list[str]:
    """Files the manifest does not list, and anything that is neither a file nor a folder."""
    problems = []
    for dirpath, dirnames, filenames in os.walk(root):  # never follows links
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            p = base / name
            rel = p.relative_to(root).as_posix()
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                problems.append(f"{rel}: is a symbolic link (bundles hold regular files only)")
            elif stat.S_ISDIR(st.st_mode):
                continue
            elif not stat.S_ISREG(st.st_mode):
                problems.append(f"{rel}: is {_kind(st.st_mode)}, not a regular file")
            elif rel not in (MANIFEST_NAME, SIGNATURE_NAME) and rel not in listed:
                problems.append(f"{rel}: not listed in the manifest")
    return problems


def parse_bundle_version(value: object) -> tuple[int, ...]:
    """Order bundle versions: an integer (``3``) or a semver-like string (``"1.4.2"``).

    Returns a tuple that sorts in release order. Pre-release/build suffixes are refused rather
    than guessed at, so no device ever installs a version it cannot order.
    Raises IntegrityError for anything else.
    """
    if isinstance(value, bool):
        raise IntegrityError(f"bundle version {value!r} is not a version")
    if isinstance(value, int):
        if value < 0:
            raise IntegrityError(f"bundle version {value} is negative")
        return (value,)
    if isinstance(value, str):
        parts = value.strip().split(".")
        if 1 <= len(parts) <= 3 and all(p.isdigit() for p in parts):
            return tuple(int(p) for p in parts)
    raise IntegrityError(
        f"bundle version {value!r} is not an integer or MAJOR[.MINOR[.PATCH]]",
        hint="build with --bundle-version 3 or --bundle-version 1.4.2",
    )
