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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import IntegrityError

MANIFEST_NAME = "manifest.json"
# Written after the manifest by `edgepack sign` (edgepack.signature), so it cannot be listed in
# it; the signature covers the manifest instead.
SIGNATURE_NAME = "provenance.intoto.jsonl"
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


def load_manifest(bundle_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and sanity-check ``manifest.json``.

    Raises IntegrityError when it is missing, not JSON, of an unknown schema, or lacks the
    file list: a bundle without a whole manifest is an unfinished one.
    """
    root = Path(bundle_dir)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise IntegrityError(
            f"bundle {str(root)!r} is not a directory",
            hint="pass the folder that `edgepack build` wrote (it holds manifest.json)",
        )
    if not path.is_file():
        raise IntegrityError(
            f"bundle {str(root)!r} has no {MANIFEST_NAME}",
            hint="the manifest is written last, so this bundle is incomplete (an interrupted "
            "build or copy?); rebuild it or copy it again",
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
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
    return data


def verify_bundle(
    bundle_dir: str | os.PathLike[str], *, check_extra: bool = True
) -> dict[str, Any]:
    """Check every file of a bundle against its manifest; return the manifest.

    Raises IntegrityError naming each missing, resized, altered or (with ``check_extra``)
    unlisted file.
    """
    root = Path(bundle_dir)
    manifest = load_manifest(root)
    problems: list[str] = []
    listed = set()
    for entry in manifest["files"]:
        rel = entry["path"]
        listed.add(rel)
        p = root / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            problems.append(f"{rel}: path escapes the bundle")
            continue
        if not p.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = p.stat().st_size
        if size != entry["size"]:
            problems.append(f"{rel}: size {size}, expected {entry['size']}")
            continue
        digest = sha256_file(p)
        if digest != entry["sha256"]:
            problems.append(f"{rel}: sha256 {digest[:16]}…, expected {entry['sha256'][:16]}…")
    if check_extra:
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root).as_posix()
            if p.is_file() and rel not in (MANIFEST_NAME, SIGNATURE_NAME) and rel not in listed:
                problems.append(f"{rel}: not listed in the manifest")
    if problems:
        raise IntegrityError(
            f"bundle {str(root)!r} does not match its manifest:\n    " + "\n    ".join(problems),
            hint="the bundle was altered or damaged; rebuild it or fetch it again",
        )
    return manifest


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
