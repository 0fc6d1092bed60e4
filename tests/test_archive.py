"""Bundle archives (``build --archive`` output) through the one safe reader, edgepack.archive:
``verify`` and ``inspect`` accept them, and anything but regular files inside the bundle
folder is refused with exit 6 before a byte is written."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.ota import make_bundle, random_model

from edgepack.archive import extract_archive, scan_archive, verify_archive
from edgepack.bundle import archive_bundle
from edgepack.cli.main import cli
from edgepack.errors import IntegrityError


@pytest.fixture
def bundle_tar(tmp_path) -> tuple[Path, Path]:
    bundle = make_bundle(tmp_path / "demo", 3, random_model(300_000, 1))
    return bundle, archive_bundle(bundle, tmp_path / "demo.tar")


def _copy_tar(src: Path, dst: Path, extra: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """``src``'s members, then ``extra`` ones (a hostile archive made with tarfile itself)."""
    with tarfile.open(src) as old, tarfile.open(dst, "w") as new:
        for m in old:
            new.addfile(m, old.extractfile(m) if m.isfile() else None)
        for info, data in extra:
            new.addfile(info, io.BytesIO(data) if data is not None else None)
    return dst


def test_verify_and_inspect_accept_the_archive(bundle_tar):
    bundle, tar = bundle_tar
    runner = CliRunner()
    ok = runner.invoke(cli, ["verify", str(tar)])
    assert ok.exit_code == 0, ok.output
    n = len(json.loads((bundle / "manifest.json").read_text())["files"])
    assert f"{n} files" in ok.output
    shown = runner.invoke(cli, ["inspect", str(tar), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["bundle"] == {"name": "demo", "version": 3}


def test_extract_gives_the_same_verified_bundle(bundle_tar, tmp_path):
    bundle, tar = bundle_tar
    out = extract_archive(scan_archive(tar), tmp_path / "out" / "b")
    for f in json.loads((bundle / "manifest.json").read_text())["files"]:
        assert (out / f["path"]).read_bytes() == (bundle / f["path"]).read_bytes()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != "b"]


def test_a_flipped_byte_is_named_and_nothing_is_left(bundle_tar, tmp_path):
    bundle, tar = bundle_tar
    data = bytearray(tar.read_bytes())
    model = next(p for p in (bundle / "model").iterdir())
    at = data.find(model.read_bytes()[:64])
    assert at > 0
    data[at + 10] ^= 0xFF
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"model/model\.gguf: sha256"):
        verify_archive(scan_archive(bad))
    dest = tmp_path / "x" / "b"
    with pytest.raises(IntegrityError, match="model.gguf"):
        extract_archive(scan_archive(bad), dest)
    assert list(dest.parent.iterdir()) == []  # no partial folder left behind
    res = CliRunner().invoke(cli, ["verify", str(bad)])
    assert res.exit_code == 6 and "model/model.gguf" in res.output


def _member(name: str, *, kind: bytes = tarfile.REGTYPE, data: bytes = b"x",
            link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


@pytest.mark.parametrize(("member", "why"), [
    (_member("demo/evil", kind=tarfile.SYMTYPE, link="/etc/passwd"), "is a link"),
    (_member("demo/hard", kind=tarfile.LNKTYPE, link="demo/server.toml"), "is a link"),
    (_member("demo/../../escape.txt"), "climbs out"),
    (_member("/etc/cron.d/evil"), "absolute path"),
    (_member("other/file.txt"), "outside the bundle folder"),
    (_member("demo/fifo", kind=tarfile.FIFOTYPE), "special file"),
    (_member("demo/server.toml"), "appears twice"),
])
def test_hostile_members_are_refused_before_writing(bundle_tar, tmp_path, member, why):
    _bundle, tar = bundle_tar
    bad = _copy_tar(tar, tmp_path / "hostile.tar", [member])
    with pytest.raises(IntegrityError, match=why):
        scan_archive(bad)
    res = CliRunner().invoke(cli, ["verify", str(bad)])
    assert res.exit_code == 6, res.output
    res = CliRunner().invoke(cli, ["inspect", str(bad)])
    assert res.exit_code == 6, res.output


def test_size_is_bounded(bundle_tar, monkeypatch):
    _bundle, tar = bundle_tar
    with pytest.raises(IntegrityError, match="more than 1000 bytes"):
        scan_archive(tar, max_bytes=1000)
    monkeypatch.setenv("EDGEPACK_MAX_ARCHIVE_BYTES", "1000")
    res = CliRunner().invoke(cli, ["verify", str(tar)])
    assert res.exit_code == 6 and "EDGEPACK_MAX_ARCHIVE_BYTES" in res.output


def test_not_a_tar_and_no_manifest(tmp_path, bundle_tar):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    res = CliRunner().invoke(cli, ["verify", str(junk)])
    assert res.exit_code == 6 and "not a readable tar" in res.output
    _bundle, tar = bundle_tar
    cut = tmp_path / "cut.tar"
    with tarfile.open(tar) as old, tarfile.open(cut, "w") as new:
        for m in old:
            if not m.name.endswith("manifest.json"):
                new.addfile(m, old.extractfile(m) if m.isfile() else None)
    with pytest.raises(IntegrityError, match="holds no demo/manifest.json"):
        scan_archive(cut)
