"""Commands for over-the-air updates: ``repo`` and ``publish`` (and ``agent``, from
``edgepack.cli.agent``).

Each command parses, calls into ``edgepack.ota.repo`` (build side) or ``edgepack.ota.agent`` (device
side), and renders. Imports happen inside the commands so ``edgepack agent`` runs on a device
without the build extras.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

# The agent's commands live in edgepack/cli/agent.py (device side); registered with these.
from edgepack.cli.agent import agent


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


@click.group("repo")
def repo() -> None:
    """Create and maintain a static, signed update repository (TUF)."""


def _expiry_options(f):
    for role, default in (("timestamp", 2), ("snapshot", 30), ("targets", 90)):
        f = click.option(f"--{role}-days", type=float, default=None,
                         help=f"Days a freshly signed {role} stays valid (default {default}; "
                         "kept in DIR/expiry.json for later publish/refresh).")(f)
    return f


def _version_arg(version: str) -> int | str:
    return int(version) if version.isdigit() else version


@repo.command("init")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--threshold", default=1, show_default=True, type=int,
              help="Number of root keys made; all of them must sign a new root.")
@click.option("--root-key", type=click.Path(path_type=Path), default=None,
              help="Write the root private key here (keep it offline) instead of DIR/keys.")
@_expiry_options
@click.option("--json", "as_json", is_flag=True,
              help="Print where things went as JSON (schema: docs/schemas/repo-init.json).")
def repo_init(directory: Path, threshold: int, root_key: Path | None,
              timestamp_days: float | None, snapshot_days: float | None,
              targets_days: float | None, as_json: bool) -> None:
    """Create an empty repository in DIRECTORY with fresh ed25519 keys.

    Serve DIRECTORY/public (nginx, S3, a CDN); never serve DIRECTORY/keys. Also writes a
    systemd service + timer (and a cron line) running `repo refresh` into DIRECTORY/systemd:
    without it the metadata expires and every device refuses updates.
    """
    from edgepack.ota.refresh import SERVICE, TIMER, write_refresh_units
    from edgepack.ota.repo import Expiry, init_repo

    expiry = Expiry.from_days(targets=targets_days, snapshot=snapshot_days,
                              timestamp=timestamp_days)
    r = init_repo(directory, threshold=threshold, root_key=root_key, expiry=expiry)
    units = write_refresh_units(r.root, expiry.timestamp)
    if as_json:
        _echo_json({"schema": 1, "root": str(r.root), "public": str(r.public),
                    "trusted_root": str(r.root_json()), "keys": str(r.keys),
                    "root_key": None if root_key is None else str(root_key),
                    "expiry": {"timestamp": str(expiry.timestamp),
                               "snapshot": str(expiry.snapshot),
                               "targets": str(expiry.targets)},
                    "refresh_units": {k: str(v) for k, v in units.items()}})
        return
    click.echo(f"repository created in {r.root}")
    click.echo(f"  serve:        {r.public}")
    click.echo(f"  trusted root: {r.root_json()}  (give it to `edgepack agent init --root`)")
    click.echo(f"  keys:         {r.keys}{'' if root_key is None else f', root: {root_key}'}")
    click.echo(f"  expiry:       timestamp {expiry.timestamp}, snapshot {expiry.snapshot}, "
               f"targets {expiry.targets}")
    click.echo("")
    click.echo(f"The timestamp expires in {expiry.timestamp}: re-sign it with `edgepack repo "
               "refresh` from a timer, or every device refuses updates after that.")
    click.echo(f"systemd ({units[SERVICE].parent}):")
    click.echo(f"  sudo cp {units[SERVICE]} {units[TIMER]} /etc/systemd/system/")
    click.echo(f"  sudo systemctl enable --now {TIMER}")
    click.echo(f"or cron (crontab -e):\n  {units['cron'].read_text().strip()}")


@repo.command("refresh")
@click.argument("directory", type=click.Path(path_type=Path))
def repo_refresh(directory: Path) -> None:
    """Re-sign the timestamp (and snapshot/targets near expiry); run it from a timer."""
    from edgepack.ota.repo import Repository

    _echo_json(Repository(directory).refresh())


@repo.command("rollout")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--channel", required=True, help="Channel the version is on.")
@click.option("--bundle-version", "version", required=True, help="The published version.")
@click.option("--percent", default=None, type=click.IntRange(0, 100),
              help="New rollout percentage (0-100) by stable hash of the device id.")
@click.option("--group", "groups", multiple=True,
              help="Device id or group name (`agent run --group`) offered this version "
              "whatever the percentage; repeat for several. Replaces the list.")
@click.option("--clear-groups", is_flag=True, help="Remove the version's group list.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def repo_rollout(directory: Path, channel: str, version: str, percent: int | None,
                 groups: tuple[str, ...], clear_groups: bool, as_json: bool) -> None:
    """Widen or narrow who is offered a published version: a percentage of devices, named
    device groups, or both (a device gets it if either includes it).

    \b
    edgepack repo rollout DIR --channel stable --bundle-version 3 --percent 0 --group canary
    edgepack repo rollout DIR --channel stable --bundle-version 3 --percent 100
    """
    from edgepack.errors import UsageError
    from edgepack.ota.repo import Repository

    if groups and clear_groups:
        raise UsageError("--group and --clear-groups exclude each other")
    new_groups = [] if clear_groups else (list(groups) if groups else None)
    meta = Repository(directory).set_rollout(channel, _version_arg(version), percent,
                                             groups=new_groups)
    out = {"channel": channel, "version": meta.get("version"), "rollout": meta.get("rollout"),
           "groups": meta.get("groups", [])}
    if as_json:
        _echo_json(out)
        return
    click.echo(f"{channel} {version}: rollout {out['rollout']}%"
               + (f", groups {', '.join(out['groups'])}" if out["groups"] else ""))


@repo.command("rollback")
@click.argument("directory", type=click.Path(path_type=Path))
@click.argument("channel")
@click.option("--to", "to", default=None,
              help="The earlier version to go back to (default: the one before the newest).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def repo_rollback(directory: Path, channel: str, to: str | None, as_json: bool) -> None:
    """Re-point CHANNEL at an earlier version: devices running a newer one go back to it.

    The newer versions are withdrawn from the channel and the signed channel says
    `rollback_to`; agents install a lower version only with that flag. Publishing a new
    version ends the rollback.
    """
    from edgepack.ota.repo import Repository

    out = Repository(directory).rollback(channel, None if to is None else _version_arg(to))
    if as_json:
        _echo_json(out)
        return
    click.echo(f"{channel}: rolled back to version {out['rollback_to']} (withdrawn: "
               f"{', '.join(str(v) for v in out['withdrawn'])})")


@repo.command("gc")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--keep", required=True, type=click.IntRange(1),
              help="Versions kept per channel (newest first; the newest version rolled out "
              "to 100% also stays).")
@click.option("--dry-run", is_flag=True, help="Report what would be deleted; change nothing.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as JSON: dropped_versions, kept_versions, files_deleted, "
              "chunks_deleted, metadata_deleted, bytes_freed, dry_run.")
def repo_gc(directory: Path, keep: int, dry_run: bool, as_json: bool) -> None:
    """Drop older versions from each channel and delete files and chunks nothing uses.

    Re-signs targets, snapshot and timestamp when a version is dropped.
    """
    from edgepack.ota.repo import Repository
    from edgepack.ota.retention import collect_garbage

    r = collect_garbage(Repository(directory), keep, dry_run=dry_run)
    if as_json:
        _echo_json(r.to_dict())
        return
    verb = "would drop" if dry_run else "dropped"
    for channel in sorted(set(r.kept_versions) | set(r.dropped_versions)):
        kept = ", ".join(map(str, r.kept_versions.get(channel, []))) or "-"
        dropped = ", ".join(map(str, r.dropped_versions.get(channel, []))) or "nothing"
        click.echo(f"{channel}: keeps {kept}; {verb} {dropped}")
    click.echo(f"{'would delete' if dry_run else 'deleted'} {r.files_deleted} files, "
               f"{r.chunks_deleted} chunks, {r.metadata_deleted} old metadata files: "
               f"{r.bytes_freed / 2**20:,.1f} MiB")


@repo.command("show")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--expiry", "with_expiry", is_flag=True,
              help="Print when each signed role expires instead of the channels.")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: {channel: [{version, rollout, groups?}]}, or with --expiry "
              "[{role, expires, seconds_left, near, expired, ...}].")
def repo_show(directory: Path, with_expiry: bool, as_json: bool) -> None:
    """List channels, versions, rollouts and groups. Warns on stderr when signed
    metadata expires soon (within a day or a quarter of its period) or has expired."""
    from edgepack.ota.repo import Repository
    from edgepack.ota.repo_view import describe, expiry_report

    r = Repository(directory)
    report = expiry_report(r)
    channels = describe(r)
    if as_json:
        _echo_json(report if with_expiry else channels)
    elif with_expiry:
        for e in report:
            state = "EXPIRED" if e["expired"] else ("soon" if e["near"] else "ok")
            click.echo(f"{e['role']:<10} expires {e['expires']}  ({state})")
    elif not channels:
        click.echo(f"no versions published in {directory}; add one with: edgepack publish "
                   f"BUNDLE --repo {directory} --channel stable")
    else:
        for channel, versions in sorted(channels.items()):
            click.echo(f"{channel}:")
            for v in versions:
                groups = f", groups {', '.join(v['groups'])}" if v.get("groups") else ""
                click.echo(f"  version {v['version']}: rollout {v['rollout']}%{groups}")
    for e in report:
        if e["near"]:
            left = e["seconds_left"]
            when = (f"expired {_duration(-left)} ago" if e["expired"]
                    else f"expires in {_duration(left)}")
            click.echo(f"warning: {e['role']} metadata {when} ({e['expires']}); devices "
                       f"refuse expired metadata. Run `edgepack repo refresh {directory}` and "
                       f"check its timer ({Path(directory) / 'systemd'})"
                       + ("; root is renewed only by signing a new root with the root "
                          "key(s), which edgepack does not automate" if e["role"] == "root"
                          else ""), err=True)


def _duration(seconds: int) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{max(seconds, 0) // 60} min"


@click.command("publish")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--repo", "repo_dir", required=True, type=click.Path(path_type=Path),
              help="Repository folder made by `edgepack repo init`.")
@click.option("--channel", required=True, help="Channel name, e.g. stable or beta.")
@click.option("--rollout", default=100, show_default=True, type=click.IntRange(0, 100),
              help="Percentage of devices (by stable hash of device id) offered this version.")
@click.option("--min-agent-version", default=None,
              help="Oldest agent that may install it (default: this edgepack's version).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as JSON (schema: docs/schemas/publish.json).")
def publish(bundle: Path, repo_dir: Path, channel: str, rollout: int,
            min_agent_version: str | None, as_json: bool) -> None:
    """Add BUNDLE as the newest version of a channel (chunked, signed)."""
    from dataclasses import asdict

    from edgepack.ota.repo import Repository

    r = Repository(repo_dir).publish(bundle, channel, rollout=rollout,
                                     min_agent_version=min_agent_version)
    if as_json:
        _echo_json({"schema": 1, **asdict(r)})
        return
    click.echo(f"published {channel} version {r.version} ({r.files} files, {r.chunks_new} new "
               f"of {r.chunks_total} chunks, {r.bytes_new} new chunk bytes)")


COMMANDS = (repo, publish, agent)
