"""Bundles are untrusted input: links, non-regular files and ill-typed manifest entries are
refused with exit 6 by `verify` (and so by serve/inspect/agent, which verify the same way).

Issue #13, Medium 5 and Low: before, a symlinked model file, ``model/`` or ``manifest.json``
pointing outside the bundle verified with exit 0, and a non-string path gave exit 1.
Bundles here come from the real bundle writer (edgepack.bundle.write_bundle).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepack.bundle import BundleSpec, write_bundle
from edgepack.cli.main import cli
from edgepack.errors import IntegrityError
from edgepack.manifest import MANIFEST_NAME, canonical_json, verify_and_hold, verify_bundle


def _bundle(tmp_path: Path, name: str = "b") -> Path:
    model = tmp_path / f"src-{name}" / "demo-Q8_0.gguf"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    spec = BundleSpec(
        name="demo-laptop", version=1, model_file=model, model_name="demo", model_format="gguf",
        model_kind="chat", quant="Q8_0", plan={"ctx": 512},
        server={"model": {"path": "model/demo-Q8_0.gguf"}},
        source={"repo_id": "org/demo"}, device={"profile_id": "laptop-x86-16gb"},
        engine={"name": "llama.cpp"}, validation={"passed": True},
        systemd_units={"edgepack-server.service": "[Service]\n"},
    )
    return write_bundle(spec, tmp_path / name)


def _model_rel(bundle: Path) -> str:
    return json.loads((bundle / MANIFEST_NAME).read_text())["model"]["path"]


def _verify_exit(bundle: Path) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["verify", str(bundle)])
    return r.exit_code, r.output


def test_a_written_bundle_verifies(tmp_path):
    code, out = _verify_exit(_bundle(tmp_path))
    assert code == 0, out


def test_model_file_symlink_to_identical_bytes_outside_is_refused(tmp_path):
    bundle = _bundle(tmp_path)
    rel = _model_rel(bundle)
    outside = tmp_path / "outside.gguf"
    shutil.copyfile(bundle / rel, outside)  # same bytes: only the link gives it away
    (bundle / rel).unlink()
    (bundle / rel).symlink_to(outside)
    code, out = _verify_exit(bundle)
    assert code == 6, out
    assert "symbolic link" in out and rel in out


def test_model_dir_symlink_is_refused(tmp_path):
    bundle = _bundle(tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.move(bundle / "model", outside)
    (bundle / "model").symlink_to(outside, target_is_directory=True)
    code, out = _verify_exit(bundle)
    assert code == 6, out
    assert "model is a symbolic link" in out


def test_manifest_symlink_is_refused(tmp_path):
    bundle = _bundle(tmp_path)
    outside = tmp_path / "manifest-elsewhere.json"
    shutil.move(bundle / MANIFEST_NAME, outside)
    (bundle / MANIFEST_NAME).symlink_to(outside)
    code, out = _verify_exit(bundle)
    assert code == 6, out
    assert "symbolic link" in out


def test_unlisted_link_and_fifo_are_refused(tmp_path):
    bundle = _bundle(tmp_path)
    (bundle / "rootfs").symlink_to("/")
    os.mkfifo(bundle / "pipe")
    code, out = _verify_exit(bundle)
    assert code == 6, out
    assert "rootfs: is a symbolic link" in out
    assert "pipe: is a named pipe" in out


def test_bundle_root_may_be_a_link(tmp_path):
    # The agent's state dir serves `current` -> slots/<version>: the root link is fine.
    bundle = _bundle(tmp_path)
    (tmp_path / "current").symlink_to(bundle, target_is_directory=True)
    assert verify_bundle(tmp_path / "current")["bundle"]["version"] == 1


@pytest.mark.parametrize("field,value", [
    ("path", 7), ("path", ["model"]), ("path", "/etc/passwd"), ("path", "model/../../x"),
    ("sha256", 1234), ("sha256", "abc"), ("size", "12"), ("size", True), ("size", -1),
])
def test_ill_typed_entries_are_integrity_errors(tmp_path, field, value):
    bundle = _bundle(tmp_path)
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest["files"][0][field] = value
    (bundle / MANIFEST_NAME).write_bytes(canonical_json(manifest))
    code, out = _verify_exit(bundle)
    assert code == 6, out
    assert field in out


def test_deeply_nested_manifest_is_an_integrity_error(tmp_path):
    bundle = _bundle(tmp_path)
    (bundle / MANIFEST_NAME).write_text("[" * 100_000 + "]" * 100_000)
    code, out = _verify_exit(bundle)
    assert code == 6, out


def test_held_file_reads_the_verified_bytes_after_a_swap(tmp_path):
    # Load what was verified: the name is swapped after the check, the descriptor is not.
    bundle = _bundle(tmp_path)
    rel = _model_rel(bundle)
    original = (bundle / rel).read_bytes()
    _, held = verify_and_hold(bundle, [rel])
    try:
        (bundle / rel).unlink()
        (bundle / rel).write_bytes(b"GGUF" + b"swapped" * 100)
        with open(held[rel].open_path, "rb") as f:
            assert f.read() == original
        with pytest.raises(IntegrityError):
            verify_bundle(bundle)
    finally:
        os.close(held[rel].fd)


def test_archive_refuses_a_bundle_with_a_link(tmp_path):
    # Issue #13: `--archive` wrote a `rootfs -> /` member; archiving verifies first now.
    from edgepack.bundle import archive_bundle

    bundle = _bundle(tmp_path)
    (bundle / "rootfs").symlink_to("/")
    with pytest.raises(IntegrityError, match="rootfs: is a symbolic link"):
        archive_bundle(bundle, tmp_path / "b.tar")
    assert not list(tmp_path.glob("*.tar")) and not list(tmp_path.glob(".*.partial"))
