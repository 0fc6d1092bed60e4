"""``edgepack install`` on this machine, into temporary prefix/state/unit folders: bundles
written by the real bundle writer, archives by the real archive writer, and a real server
started from what the install placed."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.ota import make_bundle, random_model, real_bundle

from edgepack.bundle import archive_bundle
from edgepack.cli.main import cli
from edgepack.install.installer import InstallOptions, install_bundle


def _args(tmp: Path) -> list[str]:
    return ["--prefix", str(tmp / "opt"), "--state-dir", str(tmp / "state"),
            "--unit-dir", str(tmp / "units"), "--systemd", "write", "--no-user"]


def _install(src: Path, tmp: Path, *extra: str):
    return CliRunner().invoke(cli, ["install", str(src), *_args(tmp), *extra])


def _nothing_placed(tmp: Path) -> None:
    state = tmp / "state"
    assert not (state / "current").exists() and not (state / "current").is_symlink()
    assert not any((state / "slots").iterdir()) if (state / "slots").exists() else True
    staging = state / "staging"
    assert not any(staging.iterdir()) if staging.exists() else True
    assert not (tmp / "units").exists()


def test_install_places_the_bundle_and_units(tmp_path):
    bundle = make_bundle(tmp_path / "b3", 3, random_model(50_000, 3))
    res = _install(bundle, tmp_path)
    assert res.exit_code == 0, res.output
    state = tmp_path / "state"
    assert os.readlink(state / "current") == "slots/3"
    assert (state / "slots" / "3" / "manifest.json").read_bytes() == (
        bundle / "manifest.json").read_bytes()
    server = (tmp_path / "units" / "edgepack-server.service").read_text()
    assert f"serve {state}/current --host 127.0.0.1 --port 8080" in server
    agent = (tmp_path / "units" / "edgepack-agent.service").read_text()
    assert f"--state-dir {state} " in agent and f"ReadWritePaths={state}" in agent
    assert "installed: demo version 3" in res.output
    assert "curl -fsS http://127.0.0.1:8080/readyz" in res.output
    # No runtime pack: the edgepack running the install serves it, and says so.
    assert "no runtime pack" in res.output


def test_install_twice_then_upgrade_keeps_previous(tmp_path):
    v3 = make_bundle(tmp_path / "b3", 3, random_model(50_000, 3))
    assert _install(v3, tmp_path).exit_code == 0
    before = (tmp_path / "state" / "slots" / "3" / "model" / "model.gguf").stat().st_ino
    again = _install(v3, tmp_path)
    assert again.exit_code == 0, again.output
    assert "reinstalled (unchanged)" in again.output and "already holds this bundle" in again.output
    assert (tmp_path / "state" / "slots" / "3" / "model" / "model.gguf").stat().st_ino == before
    v4 = make_bundle(tmp_path / "b4", 4, random_model(50_000, 4))
    up = _install(v4, tmp_path)
    assert up.exit_code == 0, up.output
    assert "upgraded from version 3" in up.output
    state = tmp_path / "state"
    assert os.readlink(state / "current") == "slots/4"
    assert os.readlink(state / "previous") == "slots/3"


def test_tampered_bundle_exits_6_and_places_nothing(tmp_path):
    bundle = make_bundle(tmp_path / "b3", 3, random_model(50_000, 3))
    model = bundle / "model" / "model.gguf"
    data = bytearray(model.read_bytes())
    data[100] ^= 1
    model.unlink()  # the writer hard-links; never alter a shared inode
    model.write_bytes(bytes(data))
    res = _install(bundle, tmp_path)
    assert res.exit_code == 6, res.output
    assert "model/model.gguf: sha256" in res.output
    _nothing_placed(tmp_path)


def test_install_from_the_archive(tmp_path):
    bundle = make_bundle(tmp_path / "b5", 5, random_model(80_000, 5))
    tar = archive_bundle(bundle, tmp_path / "b5.tar")
    shutil.rmtree(bundle)
    res = _install(tar, tmp_path)
    assert res.exit_code == 0, res.output
    state = tmp_path / "state"
    assert os.readlink(state / "current") == "slots/5"
    assert not any((state / "staging").iterdir())  # the unpacked copy is gone


@pytest.mark.parametrize("hostile", ["symlink", "dotdot"])
def test_hostile_archive_is_refused(tmp_path, hostile):
    bundle = make_bundle(tmp_path / "b6", 6, random_model(20_000, 6))
    tar = archive_bundle(bundle, tmp_path / "b6.tar")
    bad = tmp_path / "bad.tar"
    with tarfile.open(tar) as old, tarfile.open(bad, "w") as new:
        for m in old:
            new.addfile(m, old.extractfile(m) if m.isfile() else None)
        if hostile == "symlink":
            info = tarfile.TarInfo("b6/model/evil")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/shadow"
            new.addfile(info)
        else:
            info = tarfile.TarInfo("b6/../../../tmp/escaped")
            info.size = 3
            new.addfile(info, io.BytesIO(b"bad"))
    res = _install(bad, tmp_path)
    assert res.exit_code == 6, res.output
    assert ("is a link" if hostile == "symlink" else "climbs out") in res.output
    _nothing_placed(tmp_path)
    assert not (tmp_path / "tmp").exists()


def test_an_interrupted_copy_leaves_nothing_that_looks_installed(tmp_path, monkeypatch):
    bundle = make_bundle(tmp_path / "b7", 7, random_model(50_000, 7))
    real_copy = shutil.copyfile
    calls = []

    def dying_copy(src, dst, *a, **k):
        calls.append(src)
        if len(calls) == 2:  # after the first file: power cut
            raise KeyboardInterrupt
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(shutil, "copyfile", dying_copy)
    opts = InstallOptions(prefix=tmp_path / "opt", state_dir=tmp_path / "state",
                          unit_dir=tmp_path / "units", create_user=False, systemd="write")
    with pytest.raises(KeyboardInterrupt):
        install_bundle(bundle, opts)
    _nothing_placed(tmp_path)
    assert not [p for p in (tmp_path / "state" / "slots").iterdir()]


@pytest.mark.slow
def test_installed_bundle_serves_from_current(tmp_path):
    """The printed start command works: a real SmolLM2 bundle, installed, served from
    STATE/current by the real server, ready (model loaded, warm-up passed)."""
    import httpx
    from support.bundles import serve_bundle

    bundle = real_bundle(tmp_path / "smol", 1)
    res = _install(bundle, tmp_path, "--systemd", "no")
    assert res.exit_code == 0, res.output
    current = tmp_path / "state" / "current"
    assert f"serve {current}" in res.output
    server = serve_bundle(current)
    try:
        ready = httpx.get(f"{server.base_url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
    finally:
        server.stop()


def test_install_with_key_takes_only_bundles_that_key_signed(tmp_path):
    from edgepack.keys import generate_keypair
    from edgepack.signature import sign_bundle

    key, pub = generate_keypair(tmp_path / "keys" / "release")
    _, other = generate_keypair(tmp_path / "keys" / "other")
    bundle = make_bundle(tmp_path / "b3", 3, random_model(50_000, 3))
    unsigned = _install(bundle, tmp_path, "--key", str(pub))
    assert unsigned.exit_code == 6 and "not signed" in unsigned.output, unsigned.output
    _nothing_placed(tmp_path)
    sign_bundle(bundle, key)
    wrong = _install(bundle, tmp_path, "--key", str(other))
    assert wrong.exit_code == 6 and "does not verify" in wrong.output, wrong.output
    _nothing_placed(tmp_path)
    ok = _install(bundle, tmp_path, "--key", str(other), "--key", str(pub))
    assert ok.exit_code == 0, ok.output
    assert "signature by key" in ok.output
    # The signature travels into the slot, so `serve --require-signature` works on the device.
    slot = tmp_path / "state" / "slots" / "3"
    from edgepack.signature import verify_signed_bundle

    assert verify_signed_bundle(slot, [pub]).manifest["bundle"]["version"] == 3
