"""`edgepack repo gc DIR --keep N`: older versions dropped, unused files and chunks deleted,
and devices still install and update from what is left (over a real nginx; health gate by
the STAND-IN server, as in test_agent.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.ota import STANDIN, make_bundle, random_model

from edgepack.cli.main import cli
from edgepack.manifest import verify_bundle
from edgepack.ota.agent.config import AgentConfig
from edgepack.ota.agent.health import SubprocessLauncher
from edgepack.ota.agent.state import StateDir
from edgepack.ota.agent.updater import Agent
from edgepack.ota.release import parse_chunk_index, rollout_bucket
from edgepack.ota.repo import init_repo

MODEL = 6 << 20


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _gc(repo_dir: Path, *args: str) -> dict:
    r = CliRunner().invoke(cli, ["repo", "gc", str(repo_dir), "--json", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


@pytest.mark.slow
def test_gc_keeps_newest_and_fully_rolled_out_versions_and_devices_still_update(
        tmp_path, nginx):
    repo = init_repo(tmp_path / "repo")
    url = nginx(repo.public).url
    a, b = random_model(MODEL, seed=1), random_model(MODEL, seed=2)
    a2, b2 = bytearray(a), bytearray(b)
    a2[100:104], b2[100:104] = b"edit", b"edit"

    def publish(v, model, rollout=100):
        repo.publish(make_bundle(tmp_path / f"b{v}", v, bytes(model)), "stable",
                     rollout=rollout)

    def agent(name: str) -> Agent:
        state = StateDir(tmp_path / f"state-{name}")
        if not state.trust.exists():
            state.init(repo.root_json().read_bytes(), name)
        return Agent(state, AgentConfig(url, "stable", health_window=30),
                     launcher=SubprocessLauncher(STANDIN))

    publish(1, a)
    publish(2, a2)
    old_device = agent("old")
    assert old_device.run_once().result == "installed"  # v2, whose model gc will drop
    publish(3, b)
    publish(4, b2, rollout=30)  # a canary: most devices stay on 3

    before = _files(repo.public)
    dry = _gc(repo.root, "--keep", "1", "--dry-run")
    assert dry["dropped_versions"] == {"stable": [1, 2]} and dry["chunks_deleted"] > 0
    assert _files(repo.public) == before, "a dry run changes nothing"

    done = _gc(repo.root, "--keep", "1")
    # 4 is the newest; 3 is the newest at 100 % (devices outside the 30 % cohort need it).
    assert done["kept_versions"] == {"stable": [3, 4]}
    assert done["dropped_versions"] == {"stable": [1, 2]}
    assert done["chunks_deleted"] >= MODEL // (1 << 20) and done["bytes_freed"] >= MODEL
    show = json.loads(CliRunner().invoke(cli, ["repo", "show", str(repo.root), "--json"]).output)
    assert sorted(v["version"] for v in show["stable"]) == [3, 4]

    # Every chunk a kept index lists is still there, and no other chunk is.
    listed = set()
    for p in (repo.targets / "indexes").iterdir():
        listed |= {c.sha256 for c in parse_chunk_index(p.read_bytes(), str(p)).chunks}
    assert {c.name for c in (repo.public / "chunks").iterdir()} == listed
    assert not any(p.name.endswith(".1.json") for p in (repo.targets / "releases").rglob("*"))

    # Devices: fresh ones inside and outside the canary cohort, and one that had v2.
    outside = next(f"d{i}" for i in range(100) if rollout_bucket(f"d{i}") >= 30)
    inside = next(f"d{i}" for i in range(100) if rollout_bucket(f"d{i}") < 30)
    for name, want in ((outside, 3), (inside, 4)):
        dev = agent(name)
        assert dev.run_once().result == "installed"
        assert verify_bundle(dev.state.current_slot())["bundle"]["version"] == want
    r = old_device.run_once()
    assert r.result == "installed" and old_device.state.installed_version() in (3, 4)

    again = _gc(repo.root, "--keep", "1")
    assert again["dropped_versions"] == {} and again["files_deleted"] == 0
    assert again["chunks_deleted"] == 0
    # The newest version stayed, so an older one still cannot be published over it.
    r = CliRunner().invoke(cli, ["publish", str(tmp_path / "b2"), "--repo", str(repo.root),
                                 "--channel", "stable"])
    assert r.exit_code == 2 and "not newer" in r.output


def test_gc_refuses_keep_zero(tmp_path):
    init_repo(tmp_path / "repo")
    r = CliRunner().invoke(cli, ["repo", "gc", str(tmp_path / "repo"), "--keep", "0"])
    assert r.exit_code == 2
