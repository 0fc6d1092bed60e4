"""The bundle writer is a transaction: interrupted at any point, nothing looks complete."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgepack.bundle import BundleSpec, toml_dumps, write_bundle
from edgepack.errors import IntegrityError, UsageError
from edgepack.manifest import verify_bundle


def _spec(model: Path) -> BundleSpec:
    return BundleSpec(
        name="demo-laptop", version=2, model_file=model, model_name="demo", model_format="gguf",
        model_kind="chat", quant="Q8_0", plan={"ctx": 512}, server={"model": {"path": "m"}},
        source={"repo_id": "org/demo"}, device={"profile_id": "laptop-x86-16gb"},
        engine={"name": "llama.cpp"}, validation={"passed": True},
        systemd_units={"edgepack-server.service": "[Service]\n"},
    )


def test_written_bundle_verifies_and_is_byte_stable(tmp_path):
    model = tmp_path / "demo-Q8_0.gguf"
    model.write_bytes(b"GGUF" + bytes(1000))
    a = write_bundle(_spec(model), tmp_path / "a")
    b = write_bundle(_spec(model), tmp_path / "b")
    m = verify_bundle(a)
    assert m["bundle"] == {"name": "demo-laptop", "version": 2}
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        write_bundle(_spec(model), tmp_path / "a")


def test_failure_midway_leaves_no_bundle_and_no_partial(tmp_path, monkeypatch):
    model = tmp_path / "demo-Q8_0.gguf"
    model.write_bytes(b"GGUF")

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr("edgepack.bundle.describe_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_bundle(_spec(model), tmp_path / "out" / "demo")
    assert list((tmp_path / "out").iterdir()) == []


def test_kill_9_after_the_manifest_leaves_only_a_hidden_partial(tmp_path):
    """SIGKILL at the worst moment (manifest written, not yet renamed): the target does not
    exist, and what is left is a hidden .partial directory that no tool takes for a bundle."""
    model = tmp_path / "demo-Q8_0.gguf"
    model.write_bytes(b"GGUF" + bytes(100))
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import edgepack.bundle as b
        from test_bundle import _spec
        from pathlib import Path
        b._fsync_tree = lambda root: os.kill(os.getpid(), signal.SIGKILL)
        b.write_bundle(_spec(Path({str(model)!r})), Path({str(tmp_path / "out" / "demo")!r}))
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert p.returncode == -9, p.stderr
    left = list((tmp_path / "out").iterdir())
    assert len(left) == 1 and left[0].name.startswith(".demo.partial-")
    assert not (tmp_path / "out" / "demo").exists()
    with pytest.raises(IntegrityError):
        verify_bundle(tmp_path / "out" / "demo")


def test_toml_dumps_round_trips():
    import tomllib

    tables = {"model": {"path": 'model/a "b".gguf', "n": 3, "x": 0.5, "ok": True,
                        "providers": ["cuda", "cpu"]}}
    assert tomllib.loads(toml_dumps(tables)) == tables
