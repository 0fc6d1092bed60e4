"""The signed update repository: init, publish, refresh (real python-tuf metadata)."""

from __future__ import annotations

import json
import stat

import pytest
from click.testing import CliRunner
from support.ota import make_bundle, random_model
from tuf.api.metadata import Metadata

from edgepack.cli.main import cli
from edgepack.errors import ConfigError, UsageError
from edgepack.ota.release import parse_chunk_index, rollout_bucket, stored_target_path, version_key
from edgepack.ota.repo import init_repo


def test_init_makes_ed25519_keys_0600_and_a_self_signed_root(tmp_path):
    offline = tmp_path / "offline" / "root.pem"
    repo = init_repo(tmp_path / "repo", threshold=2, root_key=offline)
    for key in [offline, offline.with_name("root.pem.2"),
                *(repo.keys / f"{r}.key" for r in ("targets", "snapshot", "timestamp"))]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert not (repo.keys / "root.key").exists()
    root = Metadata.from_file(str(repo.root_json()))
    assert root.signed.roles["root"].threshold == 2
    assert {k.keytype for k in root.signed.keys.values()} == {"ed25519"}
    root.signed.verify_delegate("root", root.signed_bytes, root.signatures)
    assert not any(p.suffix == ".key" for p in repo.public.rglob("*")), "keys must not be served"


def test_init_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "x").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        init_repo(tmp_path / "repo")


def test_publish_chunks_large_files_and_refuses_older_or_equal_versions(tmp_path):
    repo = init_repo(tmp_path / "repo")
    model = random_model(6 << 20, seed=3)
    r1 = repo.publish(make_bundle(tmp_path / "b1", 1, bytes(model)), "stable")
    assert r1.chunks_new == r1.chunks_total > 10
    with pytest.raises(UsageError, match="not newer"):
        repo.publish(make_bundle(tmp_path / "b1b", 1, bytes(model)), "stable")
    # The same content again as version 2: no new chunk is stored.
    r2 = repo.publish(make_bundle(tmp_path / "b2", 2, bytes(model)), "stable")
    assert r2.chunks_new == 0 and r2.bytes_new == 0
    assert repo.channel_versions("stable") == [1, 2]
    # Another channel has its own versions.
    repo.publish(make_bundle(tmp_path / "b1c", 1, bytes(model)), "beta", rollout=10)
    # The chunk index is a signed target and tiles the file exactly.
    _, _, targets = repo._current()
    idx_path = next(p for p in targets.signed.targets if p.startswith("indexes/"))
    info = targets.signed.targets[idx_path]
    data = (repo.targets / stored_target_path(idx_path, info.hashes["sha256"])).read_bytes()
    index = parse_chunk_index(data, idx_path)
    assert index.size == len(model)
    assert all((repo.public / "chunks" / c.sha256).stat().st_size == c.size
               for c in index.chunks)
    rel = targets.signed.targets["releases/beta/1.json"].custom["edgepack"]
    assert rel["rollout"] == 10 and rel["channel"] == "beta" and rel["version"] == 1


def test_refresh_resigns_the_timestamp_with_a_higher_version(tmp_path):
    repo = init_repo(tmp_path / "repo")
    before = Metadata.from_file(str(repo.metadata / "timestamp.json")).signed.version
    out = repo.refresh()
    ts = Metadata.from_file(str(repo.metadata / "timestamp.json"))
    assert ts.signed.version == before + 1 == out["timestamp_version"]


def test_cli_repo_publish_and_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["repo", "init", str(tmp_path / "repo")])
    assert res.exit_code == 0, res.output
    bundle = make_bundle(tmp_path / "b", 3, b"small model")
    res = runner.invoke(cli, ["publish", str(bundle), "--repo", str(tmp_path / "repo"),
                              "--channel", "stable", "--rollout", "50"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["publish", str(bundle), "--repo", str(tmp_path / "repo"),
                              "--channel", "stable"])
    assert res.exit_code == 2 and "not newer" in res.output
    res = runner.invoke(cli, ["publish", str(bundle), "--repo", str(tmp_path / "nope"),
                              "--channel", "stable"])
    assert res.exit_code == 3 and "repo init" in res.output
    res = runner.invoke(cli, ["repo", "rollout", str(tmp_path / "repo"), "--channel", "stable",
                              "--bundle-version", "3", "--percent", "100"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["repo", "show", str(tmp_path / "repo"), "--json"])
    assert json.loads(res.output) == {"stable": [{"rollout": 100, "version": 3}]}


def test_versions_order_integers_and_dotted_versions():
    assert version_key(2) < version_key("2.0.1") < version_key("10")
    assert version_key(3) == version_key("3.0.0")


def test_rollout_buckets_are_stable_and_spread():
    ids = [f"device-{i}" for i in range(2000)]
    assert [rollout_bucket(d) for d in ids[:5]] == [rollout_bucket(d) for d in ids[:5]]
    share = sum(rollout_bucket(d) < 30 for d in ids) / len(ids)
    assert 0.26 < share < 0.34
