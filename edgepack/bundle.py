"""Write a bundle: a directory the device can verify file by file.

The write is a transaction, in the manner of Ollama's pulls: everything goes into a hidden
temporary directory beside the target, ``manifest.json`` is written last, the directory is
fsynced and then renamed into place. A build killed at any point leaves either no bundle or
a hidden ``.*.partial-*`` directory without a manifest, never something that looks complete.

Same inputs give the same bytes: no timestamps, canonical JSON, sorted file lists.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack import __version__
from edgepack.errors import BuildError, UsageError
from edgepack.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    canonical_json,
    describe_files,
    parse_bundle_version,
    verify_bundle,
)


@dataclass(frozen=True)
class BundleSpec:
    """Everything a bundle is made of; the build fills it, ``write_bundle`` writes it."""

    name: str
    version: int | str
    model_file: Path
    model_name: str
    model_format: str  # gguf | onnx
    model_kind: str  # chat | completion | embedding
    quant: str
    plan: Mapping[str, Any]
    server: Mapping[str, Mapping[str, Any]]  # server.toml tables
    source: Mapping[str, Any]  # repo, revision, files {path: sha256}
    device: Mapping[str, Any]  # profile_id, profile_digest
    engine: Mapping[str, Any]
    validation: Mapping[str, Any]
    extra_model_files: tuple[Path, ...] = ()  # e.g. ONNX external data
    tokenizer_files: tuple[Path, ...] = ()
    golden_prompts: tuple[Mapping[str, Any], ...] = ()
    model_details: Mapping[str, Any] = field(default_factory=dict)
    converter: Mapping[str, Any] = field(default_factory=dict)
    systemd_units: Mapping[str, str] = field(default_factory=dict)
    # The runtime pack (edgepack.build.runtime_pack): bundle-relative path -> source file,
    # and its facts for the manifest's "runtime" table (absent without a pack).
    runtime_files: Mapping[str, Path] = field(default_factory=dict)
    runtime: Mapping[str, Any] | None = None
    # The model card's facts and the licence texts (shipped under license/, as licences such
    # as Apache-2.0 §4(a) ask of redistribution), and what this bundle changed.
    card: Mapping[str, Any] = field(default_factory=dict)
    derivation: Mapping[str, Any] = field(default_factory=dict)
    license_files: tuple[tuple[str, Path], ...] = ()  # (name, local path)


# Writes more files into the unfinished bundle once the others are hashed (the SBOM describes
# them); gets the directory and the file list so far, returns the relative paths it wrote.
DocumentWriter = Callable[[Path, list[dict[str, Any]]], list[str]]
LICENSE_DIR = "license"


def toml_dumps(tables: Mapping[str, Mapping[str, Any]]) -> str:
    """Render flat TOML tables of str/int/float/bool/list values (all server.toml needs)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    out = []
    for table, items in tables.items():
        out.append(f"[{table}]")
        out += [f"{k} = {value(v)}" for k, v in items.items() if v is not None]
        out.append("")
    return "\n".join(out)


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # same filesystem: no copy of a multi-GB model
    except OSError:
        shutil.copyfile(src, dst)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def manifest_for(spec: BundleSpec, files: list[dict[str, Any]], model_rel: str) -> dict[str, Any]:
    """The manifest document (pure), given the hashed file list."""
    model_entry = next(f for f in files if f["path"] == model_rel)
    return {
        "schema": SCHEMA_VERSION,
        "edgepack_version": __version__,
        "bundle": {"name": spec.name, "version": spec.version},
        "model": {
            "name": spec.model_name,
            "format": spec.model_format,
            "kind": spec.model_kind,
            "path": model_rel,
            "sha256": model_entry["sha256"],
            "size": model_entry["size"],
            "quant": spec.quant,
            **dict(spec.model_details),
        },
        "source": dict(spec.source),
        "device": dict(spec.device),
        "plan": dict(spec.plan),
        "engine": dict(spec.engine),
        "converter": dict(spec.converter),
        "validation": dict(spec.validation),
        "golden_prompts": [dict(g) for g in spec.golden_prompts],
        **({"card": dict(spec.card)} if spec.card else {}),
        **({"derivation": dict(spec.derivation)} if spec.derivation else {}),
        "files": files,
        **({"runtime": dict(spec.runtime)} if spec.runtime is not None else {}),
    }


def write_bundle(spec: BundleSpec, out_dir: Path, *, overwrite: bool = False,
                 documents: DocumentWriter | None = None) -> Path:
    """Write the bundle to ``out_dir`` atomically; return the path.

    ``documents`` (e.g. the SBOM writer) runs after every other file is in place and hashed,
    before the manifest, so what it writes is listed in the manifest too.

    Raises UsageError if ``out_dir`` exists and ``overwrite`` is false. The files are hashed
    once, as they are written into the manifest; they are not read a second time to verify
    (a multi-GB model would be read twice for nothing: ``edgepack verify`` does that on demand).
    """
    parse_bundle_version(spec.version)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UsageError(
            f"output {str(out_dir)!r} already exists",
            hint="choose another --out directory or remove the old bundle",
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        model_rel = f"model/{spec.model_file.name}"
        _place(spec.model_file, tmp / model_rel)
        for extra in spec.extra_model_files:
            _place(extra, tmp / "model" / extra.name)
        for tok in spec.tokenizer_files:
            _place(tok, tmp / "tokenizer" / tok.name)
        (tmp / "server.toml").write_text(toml_dumps(spec.server), encoding="utf-8")
        for rel, src in sorted(spec.runtime_files.items()):
            _place(src, tmp / rel)
        for unit, text in sorted(spec.systemd_units.items()):
            (tmp / "systemd").mkdir(exist_ok=True)
            (tmp / "systemd" / unit).write_text(text, encoding="utf-8")
        for lic_name, lic_path in spec.license_files:
            _place(lic_path, tmp / LICENSE_DIR / lic_name)
        rels = [p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file()]
        files = [e.to_dict() for e in describe_files(tmp, rels)]
        if documents is not None:
            added = documents(tmp, [dict(f) for f in files])
            files = sorted(files + [e.to_dict() for e in describe_files(tmp, added)],
                           key=lambda f: f["path"])
        # The manifest goes last: its presence is what marks the bundle complete.
        (tmp / MANIFEST_NAME).write_bytes(canonical_json(manifest_for(spec, files, model_rel)))
        _fsync_tree(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def archive_bundle(bundle_dir: Path, archive: Path) -> Path:
    """One reproducible .tar of a verified bundle, for USB or sneakernet transport."""
    verify_bundle(bundle_dir)
    archive = Path(archive)
    tmp = archive.with_name(f".{archive.name}.partial")

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            paths = sorted(p for p in bundle_dir.rglob("*"))
            # The manifest last in the archive too: an extraction cut short looks incomplete.
            paths.sort(key=lambda p: p.name == MANIFEST_NAME)
            for p in paths:
                rel = Path(bundle_dir.name) / p.relative_to(bundle_dir)
                tar.add(p, arcname=rel.as_posix(), recursive=False, filter=normalise)
        os.replace(tmp, archive)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"could not write archive {str(archive)!r}: {e}") from e
    return archive
