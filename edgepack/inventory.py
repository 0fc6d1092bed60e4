"""What is built and cached, with sizes, and removing it safely (``list``, ``rm``, ``cache``).

Bundles are folders holding a ``manifest.json`` (the manifest is written last, so a folder
without one is an interrupted write: the bundle writer's hidden ``.NAME.partial-*`` folders are
listed as such). The cache is ``edgepack.paths.cache_dir()``: one entry per file or folder
directly under each of its sections (converter, intermediate, quantized, onnx,
onnx-quantized), each keyed by what it was made from, so removing one only costs time.

Removal renames the entry to a hidden ``.trash-*`` name first and deletes it after, so an
interrupted ``rm`` or ``prune`` never leaves half a bundle or half a cache entry under its
real name (a later run deletes leftover trash).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.errors import UsageError
from edgepack.manifest import MANIFEST_NAME

CACHE_SECTIONS = {
    "converter": "llama.cpp's GGUF converter, extracted from the llama-cpp-python sdist",
    "intermediate": "f16/f32 GGUF conversions of pulled models (one per source and converter)",
    "quantized": "quantized GGUF files (one folder per intermediate and llama.cpp version)",
    "onnx": "ONNX exports made with optimum",
    "onnx-quantized": "quantized ONNX graphs",
}
_TRASH = ".trash-"


def tree_size(path: Path) -> int:
    """Bytes in ``path`` (a file, or every file below a folder; links not followed)."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_size
            except OSError:
                pass
    return total


@dataclass(frozen=True)
class BundleEntry:
    path: Path
    name: str
    version: Any
    device: str | None
    format: str | None
    quant: str | None
    size_bytes: int
    validation_passed: bool | None
    modified: float
    complete: bool

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "name": self.name, "version": self.version,
                "device": self.device, "format": self.format, "quant": self.quant,
                "size_bytes": self.size_bytes, "validation_passed": self.validation_passed,
                "modified": round(self.modified, 3), "complete": self.complete}


def list_bundles(folder: Path) -> list[BundleEntry]:
    """The bundles directly in ``folder`` (and interrupted writes, ``complete`` false)."""
    if not folder.is_dir():
        raise UsageError(f"{str(folder)!r} is not a folder",
                         hint="give the folder your bundles are in (build's --out, "
                         "default ./bundles)")
    out = []
    for path in sorted(folder.iterdir()):
        if not path.is_dir() or path.name.startswith(_TRASH):
            continue
        manifest = path / MANIFEST_NAME
        if manifest.is_file():
            try:
                m = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                m = None
            if isinstance(m, dict):
                model, val = m.get("model", {}), m.get("validation", {})
                out.append(BundleEntry(
                    path=path, name=m.get("bundle", {}).get("name", path.name),
                    version=m.get("bundle", {}).get("version"),
                    device=m.get("device", {}).get("profile_id"), format=model.get("format"),
                    quant=model.get("quant"), size_bytes=tree_size(path),
                    validation_passed=val.get("passed"), modified=manifest.stat().st_mtime,
                    complete=True))
                continue
        if path.name.startswith(".") and ".partial-" in path.name:
            out.append(BundleEntry(path=path, name=path.name, version=None, device=None,
                                   format=None, quant=None, size_bytes=tree_size(path),
                                   validation_passed=None, modified=path.stat().st_mtime,
                                   complete=False))
    return out


def _discard(path: Path) -> int:
    """Rename ``path`` out of the way, then delete it; the bytes freed."""
    size = tree_size(path)
    trash = Path(tempfile.mkdtemp(prefix=_TRASH, dir=path.parent))
    os.replace(path, trash / path.name)
    shutil.rmtree(trash, ignore_errors=True)
    return size


def remove_bundle(path: Path) -> int:
    """Delete a bundle folder (or an interrupted write); refuse anything else. Bytes freed."""
    if not path.is_dir():
        raise UsageError(f"{str(path)!r} is not a bundle folder",
                         hint="see what is there with: edgepack list FOLDER")
    partial = path.name.startswith(".") and ".partial-" in path.name
    if not (path / MANIFEST_NAME).is_file() and not partial:
        raise UsageError(
            f"{str(path)!r} has no {MANIFEST_NAME}: not a bundle, so edgepack will not "
            "delete it", hint="delete it yourself if you are sure")
    return _discard(path)


@dataclass(frozen=True)
class CacheEntry:
    section: str
    path: Path
    size_bytes: int
    modified: float

    def to_dict(self) -> dict[str, Any]:
        return {"section": self.section, "path": str(self.path), "size_bytes": self.size_bytes,
                "modified": round(self.modified, 3)}


def cache_entries(root: Path) -> list[CacheEntry]:
    """Every entry of edgepack's cache at ``root``, newest first within a section."""
    out: list[CacheEntry] = []
    for section in CACHE_SECTIONS:
        folder = root / section
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith(_TRASH):
                shutil.rmtree(path, ignore_errors=True)  # an interrupted earlier prune
                continue
            try:
                st = path.lstat()
            except OSError:
                continue
            out.append(CacheEntry(section, path, tree_size(path), st.st_mtime))
    return sorted(out, key=lambda e: (list(CACHE_SECTIONS).index(e.section), -e.modified))


def select_for_prune(entries: list[CacheEntry], *, older_than_days: float | None = None,
                     sections: tuple[str, ...] = (), everything: bool = False,
                     now: float | None = None) -> list[CacheEntry]:
    """The entries a prune with these filters removes (at least one filter is required)."""
    unknown = sorted(set(sections) - set(CACHE_SECTIONS))
    if unknown:
        raise UsageError(f"--section {unknown[0]!r} is not a cache section",
                         hint="one of: " + ", ".join(CACHE_SECTIONS))
    if not everything and older_than_days is None and not sections:
        raise UsageError("cache prune needs --older-than DAYS, --section NAME or --all",
                         hint="see what is there first: edgepack cache ls")
    t = time.time() if now is None else now
    chosen = []
    for e in entries:
        if sections and e.section not in sections:
            continue
        if older_than_days is not None and t - e.modified < older_than_days * 86400:
            continue
        chosen.append(e)
    return chosen


def prune(entries: list[CacheEntry]) -> int:
    """Delete ``entries``; the bytes freed."""
    return sum(_discard(e.path) for e in entries if e.path.exists() or e.path.is_symlink())
