"""`edgepack list`, `rm`, `cache ls`, `cache prune` on real bundles and a real build cache made
by `edgepack build` (fresh cache: the shared test cache is never touched)."""

from __future__ import annotations

import json
import os
import time

import pytest
from click.testing import CliRunner
from support.schemas import check_json

from edgepack.cli.main import cli
from edgepack.manifest import verify_bundle

pytestmark = pytest.mark.slow
DEVICES = ("laptop-x86-16gb", "raspberry-pi-5-8gb")


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llama_dir):
    """Two real bundles (two quants) and the fresh build cache that made them."""
    tmp = tmp_path_factory.mktemp("inventory")
    env = {"EDGEPACK_CACHE": str(tmp / "cache")}
    args = ["build", str(tiny_llama_dir), "--no-golden", "--min-agreement", "0.3",
            "--out", str(tmp / "bundles"), "--quant", "laptop-x86-16gb=Q8_0",
            "--quant", "raspberry-pi-5-8gb=Q4_0", "-q"]
    for d in DEVICES:
        args += ["--device", d]
    r = CliRunner().invoke(cli, args, env=env)
    assert r.exit_code == 0, r.output
    return tmp / "bundles", env


def run(args, env=None, input=None):
    return CliRunner().invoke(cli, args, env=env, input=input)


def test_list_shows_each_bundle_with_its_size(built):
    folder, _ = built
    r = run(["list", str(folder)], env={"COLUMNS": "100"})
    assert r.exit_code == 0, r.output
    for d, q in zip(DEVICES, ("Q8_0", "Q4_0"), strict=True):
        row = next(line for line in r.output.splitlines() if d in line)
        assert q in row and "MiB" in row and "yes" in row
    data = check_json("list", run(["list", str(folder), "--json"]).stdout)
    sizes = {b["device"]: b["size_bytes"] for b in data["bundles"]}
    for b in data["bundles"]:
        path = folder / os.path.basename(b["path"])
        assert b["size_bytes"] == sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        assert verify_bundle(path)["bundle"]["name"] == b["name"]
    assert data["total_bytes"] == sum(sizes.values())
    assert sizes["raspberry-pi-5-8gb"] < sizes["laptop-x86-16gb"]  # Q4_0 is smaller


def test_rm_removes_only_bundles(built, tmp_path):
    folder, _ = built
    not_a_bundle = tmp_path / "photos"
    not_a_bundle.mkdir()
    r = run(["rm", "-y", str(not_a_bundle)])
    assert r.exit_code == 2 and "not a bundle" in r.output and not_a_bundle.is_dir()
    # An interrupted write (the bundle writer's hidden partial folder) is listed and removable.
    partial = folder / ".some-bundle.partial-abc123"
    (partial / "model").mkdir(parents=True)
    (partial / "model" / "m.gguf").write_bytes(b"\0" * 1000)
    listed = json.loads(run(["list", str(folder), "--json"]).stdout)["bundles"]
    assert [b["complete"] for b in listed if b["path"] == str(partial)] == [False]
    (target,) = [folder / os.path.basename(b["path"]) for b in listed
                 if b["device"] == "raspberry-pi-5-8gb"]
    # Without -y it asks; "n" keeps the bundle.
    r = run(["rm", str(target)], input="n\n")
    assert r.exit_code == 1 and target.is_dir()
    r = run(["rm", str(target), str(partial), "--json"])
    data = check_json("removed", r.stdout)
    assert data["removed"] == [str(target), str(partial)] and data["freed_bytes"] > 1000
    assert not target.exists() and not partial.exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".trash-")]
    left = json.loads(run(["list", str(folder), "--json"]).stdout)["bundles"]
    assert [b["device"] for b in left] == ["laptop-x86-16gb"]


def test_cache_ls_and_prune(built):
    _, env = built
    data = check_json("cache-ls", run(["cache", "ls", "--json"], env=env).stdout)
    sections = {e["section"] for e in data["entries"]}
    assert {"converter", "intermediate", "quantized"} <= sections
    assert data["total_bytes"] == sum(e["size_bytes"] for e in data["entries"])
    human = run(["cache", "ls"], env={**env, "COLUMNS": "90"})
    assert "intermediate" in human.output and "entries in" in human.output

    assert run(["cache", "prune"], env=env).exit_code == 2  # no filter: refuses
    assert run(["cache", "prune", "--section", "nope"], env=env).exit_code == 2
    # Nothing is older than a day: nothing removed.
    r = run(["cache", "prune", "--older-than", "1", "--json"], env=env)
    assert check_json("removed", r.stdout)["removed"] == []
    quantized = [e for e in data["entries"] if e["section"] == "quantized"]
    dry = check_json("removed", run(["cache", "prune", "--section", "quantized", "--dry-run",
                                     "--json"], env=env).stdout)
    assert sorted(dry["removed"]) == sorted(e["path"] for e in quantized) and dry["dry_run"]
    assert all(os.path.exists(p) for p in dry["removed"])
    real = check_json("removed", run(["cache", "prune", "--section", "quantized", "--json"],
                                     env=env).stdout)
    assert real["freed_bytes"] == sum(e["size_bytes"] for e in quantized) > 0
    assert not any(os.path.exists(p) for p in real["removed"])
    after = json.loads(run(["cache", "ls", "--json"], env=env).stdout)
    assert "quantized" not in {e["section"] for e in after["entries"]}
    # --older-than 0 takes everything left (written before now).
    time.sleep(0.01)
    run(["cache", "prune", "--older-than", "0", "-q"], env=env)
    assert json.loads(run(["cache", "ls", "--json"], env=env).stdout)["entries"] == []
