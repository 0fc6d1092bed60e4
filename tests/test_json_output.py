"""--json results match their documented schemas (docs/schemas/), on real bundles and a real
signed repository; docs/json.md names every command that has --json."""

from __future__ import annotations

from pathlib import Path

import click
from click.testing import CliRunner
from support.ota import make_bundle, random_model
from support.schemas import SCHEMAS, check_json

from edgepack.cli.main import cli
from edgepack.manifest import load_manifest

DOC = SCHEMAS.parent / "json.md"


def run(*args: str):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def test_verify_json(tmp_path):
    bundle = make_bundle(tmp_path / "b", 1, bytes(random_model(1 << 16, seed=1)))
    data = check_json("verify", run("verify", bundle, "--json").stdout)
    assert data["bundle"] == str(bundle) and data["signature"] is None
    assert data["files"] == len(load_manifest(bundle)["files"])
    # A bad bundle is an error (exit 6), never an "ok": false document.
    (bundle / "server.toml").write_text("tampered")
    bad = CliRunner().invoke(cli, ["verify", str(bundle), "--json"])
    assert bad.exit_code == 6 and bad.stdout == ""


def test_repo_init_and_publish_json(tmp_path):
    init = check_json("repo-init", run("repo", "init", tmp_path / "repo", "--json").stdout)
    assert Path(init["trusted_root"]).is_file() and Path(init["public"]).is_dir()
    bundle = make_bundle(tmp_path / "b", 3, bytes(random_model(1 << 16, seed=2)))
    pub = check_json("publish", run("publish", bundle, "--repo", tmp_path / "repo",
                                    "--channel", "stable", "--json").stdout)
    assert pub["channel"] == "stable" and pub["version"] == 3
    assert pub["files"] == len(load_manifest(bundle)["files"]) + 1  # + manifest.json
    human = run("publish", make_bundle(tmp_path / "b4", 4, bytes(random_model(1 << 16, seed=3))),
                "--repo", tmp_path / "repo", "--channel", "stable")
    assert human.stdout.startswith("published stable version 4")


def _json_commands() -> list[str]:
    out = []

    def walk(group: click.Group, prefix: tuple[str, ...]) -> None:
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                walk(command, (*prefix, name))
            elif any("--json" in getattr(p, "opts", ()) for p in command.params):
                out.append(" ".join((*prefix, name)))

    walk(cli, ())
    return sorted(out)


def test_every_json_command_is_documented():
    text = DOC.read_text(encoding="utf-8")
    missing = [c for c in _json_commands() if f"`edgepack {c}" not in text]
    assert not missing, f"document the --json output of {missing} in {DOC}"
    for schema in SCHEMAS.glob("*.json"):
        assert f"schemas/{schema.name}" in text, f"{schema.name} is not linked from {DOC}"


def test_repo_show_and_gc_read_as_text_by_default(tmp_path):
    run("repo", "init", tmp_path / "repo")
    empty = run("repo", "show", tmp_path / "repo").stdout
    assert "no versions published" in empty
    for v in (1, 2):
        run("publish", make_bundle(tmp_path / f"b{v}", v, bytes(random_model(1 << 16, seed=v))),
            "--repo", tmp_path / "repo", "--channel", "stable")
    shown = run("repo", "show", tmp_path / "repo").stdout
    assert shown.splitlines()[:3] == ["stable:", "  version 1: rollout 100%",
                                      "  version 2: rollout 100%"]
    expiry = run("repo", "show", tmp_path / "repo", "--expiry").stdout
    assert [line.split()[0] for line in expiry.splitlines()] == [
        "timestamp", "snapshot", "targets", "root"]
    gc = run("repo", "gc", tmp_path / "repo", "--keep", "1", "--dry-run").stdout
    assert "stable: keeps 2; would drop 1" in gc and "would delete" in gc
