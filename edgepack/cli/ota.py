"""Commands for over-the-air updates: ``repo``, ``publish`` and ``agent``.

Each command parses, calls into ``edgepack.ota.repo`` (build side) or ``edgepack.ota.agent`` (device
side), and renders. Imports happen inside the commands so ``edgepack agent`` runs on a device
without the build extras.
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

import click

from edgepack.errors import EdgepackError


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
    from edgepack.ota.repo import Repository, describe, expiry_report

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


@click.group("agent")
def agent() -> None:
    """The device's update agent."""


@agent.command("init")
@click.option("--root", "root_json", required=True, type=click.Path(path_type=Path,
              exists=True, dir_okay=False), help="The repository's trusted root.json.")
@click.option("--state-dir", default=Path("/var/lib/edgepack"), show_default=True,
              envvar="EDGEPACK_STATE_DIR", show_envvar=True, type=click.Path(path_type=Path),
              help="The agent's state folder (slots, current, journal), as in the systemd "
              "units.")
@click.option("--device-id", default=None, help="This device's id (default: a random UUID).")
def agent_init(root_json: Path, state_dir: Path, device_id: str | None) -> None:
    """Provision a device with the repository's trusted root."""
    from edgepack.ota.agent.state import StateDir

    s = StateDir(state_dir)
    s.init(root_json.read_bytes(), device_id)
    click.echo(f"provisioned {s.root} (device id {s.device_id()})")


def _outcome_help() -> str:
    from edgepack.ota.agent.outcome import OUTCOMES

    return "; ".join(f"{name} {code if code >= 0 else 'its error code'}"
                     for name, (code, _) in OUTCOMES.items())


@agent.command("run")
@click.option("--repo-url", required=True, help="Base URL serving the repository's public/.")
@click.option("--state-dir", default=Path("/var/lib/edgepack"), show_default=True,
              envvar="EDGEPACK_STATE_DIR", show_envvar=True, type=click.Path(path_type=Path),
              help="The agent's state folder (slots, current, journal), as in the systemd "
              "units.")
@click.option("--channel", required=True, help="Channel to follow.")
@click.option("--device-id", default=None, help="Override the provisioned device id.")
@click.option("--group", "groups", multiple=True, envvar="EDGEPACK_GROUPS", show_envvar=True,
              help="A device group this device belongs to (repeat; the variable is "
              "space-separated). Releases rolled out to the group reach it.")
@click.option("--once", is_flag=True,
              help="One cycle, then exit with its outcome: up-to-date 0, installed 10, "
              "held-back 11, blocked 12, channel-not-found 3, rolled-back 7, failed: the "
              "error's code (4 fetch, 6 integrity).")
@click.option("--json", "as_json", is_flag=True, help="With --once: the outcome as JSON.")
@click.option("--interval", default=900.0, show_default=True, type=float,
              help="Seconds between cycles.")
@click.option("--retry-min", default=10.0, show_default=True, type=click.FloatRange(0.01),
              help="First retry after a failure, in seconds; doubles per failure (with "
              "jitter) up to --interval.")
@click.option("--deadline", default=3600.0, show_default=True, type=float,
              help="Total seconds one update may take to download.")
@click.option("--gap-timeout", default=15.0, show_default=True, type=float,
              help="Longest silence from the server, in seconds.")
@click.option("--health-window", default=180.0, show_default=True, type=float,
              help="Seconds for a new bundle to become ready and answer its golden prompt.")
@click.option("--restart-command", default=None, envvar="EDGEPACK_RESTART_COMMAND",
              show_envvar=True,
              help="Run after switching, e.g. 'systemctl restart edgepack-server'.")
@click.option("--serve-url", default=None, envvar="EDGEPACK_SERVE_URL", show_envvar=True,
              help="The main server, checked after --restart-command (roll back on failure).")
@click.option("--memory-budget-bytes", default=None, type=click.IntRange(1),
              envvar="EDGEPACK_MEMORY_BUDGET_BYTES", show_envvar=True,
              help="Memory the old and new servers may use together. When both bundles' "
              "plans do not fit, the agent stops the old server, switches and starts the new "
              "one through --restart-command and gates it at --serve-url (stop-swap-start). "
              "Default: the new plan must fit in the memory available now.")
@click.option("--broker", default=None, envvar="EDGEPACK_BROKER_URL", show_envvar=True,
              help="Report state and events to this MQTT broker: mqtt://[user:pass@]host"
              "[:1883] or mqtts://host[:8883]. Optional; never blocks or fails an update.")
@click.option("--fleet", default="default", show_default=True, envvar="EDGEPACK_FLEET",
              show_envvar=True, help="Fleet name in the MQTT topics edgepack/FLEET/DEVICE/...")
@click.option("--broker-username", default=None, envvar="EDGEPACK_BROKER_USERNAME",
              show_envvar=True, help="MQTT username.")
@click.option("--broker-password", default=None, envvar="EDGEPACK_BROKER_PASSWORD",
              show_envvar=True, help="MQTT password (prefer the variable).")
@click.option("--broker-ca", default=None, type=click.Path(exists=True, dir_okay=False),
              help="CA file for mqtts:// (default: the system's).")
@click.option("--broker-cert", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Client certificate for mutual TLS (with --broker-key).")
@click.option("--broker-key", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Client key for mutual TLS.")
@click.option("--progress-every", default=5.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds between download progress lines in the log.")
@click.option("-v", "--verbose", is_flag=True, help="Debug lines in the log.")
def agent_run(repo_url: str, state_dir: Path, channel: str, device_id: str | None,
              groups: tuple[str, ...], once: bool, as_json: bool, interval: float,
              retry_min: float, deadline: float, gap_timeout: float, health_window: float,
              restart_command: str | None, serve_url: str | None,
              memory_budget_bytes: int | None, broker: str | None, fleet: str,
              broker_username: str | None, broker_password: str | None,
              broker_ca: str | None, broker_cert: str | None, broker_key: str | None,
              progress_every: float, verbose: bool) -> None:
    """Check for, fetch, verify, health-gate and switch to new bundles.

    A new bundle starts side by side on a free port when it fits in memory beside the running
    one, else stop-swap-start (see --memory-budget-bytes). A bundle that fails readiness or
    its golden prompts is rolled back, its version blocked, and the reason recorded for
    `edgepack agent status`. Looping, a failed cycle is retried with jittered exponential
    backoff from --retry-min up to --interval; SIGTERM exits 0 (an update in progress resumes
    at the next start).
    """
    import os

    from edgepack.ota.agent.loop import remove_logging, setup_logging

    handler = setup_logging(os.environ, verbose=verbose)
    try:
        _agent_run(repo_url, state_dir, channel, device_id, groups, once, as_json, interval,
                   retry_min, deadline, gap_timeout, health_window, restart_command,
                   serve_url, memory_budget_bytes, broker, fleet, broker_username,
                   broker_password, broker_ca, broker_cert, broker_key, progress_every)
    finally:
        remove_logging(handler)


def _agent_run(repo_url, state_dir, channel, device_id, groups, once, as_json, interval,
               retry_min, deadline, gap_timeout, health_window, restart_command, serve_url,
               memory_budget_bytes, broker, fleet, broker_username, broker_password,
               broker_ca, broker_cert, broker_key, progress_every) -> None:
    from edgepack.ota.agent.loop import AgentStopped, StopSignal, run_forever
    from edgepack.ota.agent.outcome import exit_code
    from edgepack.ota.agent.state import StateDir
    from edgepack.ota.agent.updater import Agent, AgentConfig
    from edgepack.ota.release import check_channel, check_group

    flat_groups = tuple(check_group(g) for item in groups for g in item.split())
    config = AgentConfig(
        repo_url=repo_url, channel=check_channel(channel), device_id=device_id,
        deadline=deadline, gap_timeout=gap_timeout, health_window=health_window,
        restart_command=tuple(shlex.split(restart_command)) if restart_command else (),
        serve_url=serve_url, memory_budget_bytes=memory_budget_bytes, groups=flat_groups,
        progress_every=progress_every)
    state = StateDir(state_dir)
    state.check()
    reporter = None
    if broker:
        reporter = _start_reporter(state, config, broker, fleet, broker_username,
                                   broker_password, broker_ca, broker_cert, broker_key)
    a = Agent(state, config, reporter=reporter)
    stop = StopSignal()
    stop.install()

    def cycle():
        r = a.run_once()
        if r.result in ("installed", "rolled-back"):
            msg = f"{r.result} version {r.version}"
        else:
            msg = r.result + (f" (running version {r.version})" if r.version is not None
                              else " (nothing installed)")
        msg += (f": {r.reason}" if r.reason else "") + f" ({r.bytes_downloaded} bytes downloaded)"
        return r, msg

    try:
        if once:
            stop.in_cycle = True
            try:
                r, msg = cycle()
            except AgentStopped:
                return
            if as_json:
                _echo_json({"outcome": r.result, "version": r.version, "reason": r.reason,
                            "bytes_downloaded": r.bytes_downloaded,
                            "exit_code": exit_code(r.result), "details": r.details})
            else:
                click.echo(msg)
            if exit_code(r.result):
                raise click.exceptions.Exit(exit_code(r.result))
            return

        def loop_cycle() -> None:
            r, msg = cycle()
            level = logging.WARNING if r.result in ("rolled-back", "blocked") else logging.INFO
            logging.getLogger("edgepack.agent").log(level, "%s", msg)

        def on_error(e: BaseException) -> None:
            text = e.render() if isinstance(e, EdgepackError) else f"{type(e).__name__}: {e}"
            logging.getLogger("edgepack.agent").error("%s", text.replace("\n", " "))

        run_forever(loop_cycle, on_error, interval=interval, retry_min=retry_min, stop=stop)
    finally:
        stop.restore()
        if reporter is not None:
            reporter.close()


def _start_reporter(state, config, broker: str, fleet: str, username, password, ca, cert,
                    key):
    from edgepack.ota.agent.broker import parse_broker
    from edgepack.ota.agent.report import (
        MqttReporter,
        device_status,
        health_figures,
        serving_readiness,
    )

    cfg = parse_broker(broker, fleet=fleet, username=username, password=password,
                       ca_file=ca, cert_file=cert, key_file=key)
    device_id = config.device_id or state.device_id()

    def snapshot() -> dict:
        data = device_status(state, device_id)
        data["serving"] = serving_readiness(config.serve_url)
        data["health"] = health_figures(state.root)
        return data

    return MqttReporter(cfg, device_id, snapshot).start()


@agent.command("status")
@click.option("--state-dir", default=Path("/var/lib/edgepack"), show_default=True,
              envvar="EDGEPACK_STATE_DIR", show_envvar=True, type=click.Path(path_type=Path),
              help="The agent's state folder (slots, current, journal), as in the systemd "
              "units.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def agent_status(state_dir: Path, as_json: bool) -> None:
    """Repo URL, channel, device id, cohort, installed/previous/pending, last check, last
    outcome and why, blocked versions with reasons."""
    from edgepack.ota.agent.report import device_status
    from edgepack.ota.agent.state import StateDir

    s = StateDir(state_dir)
    s.check()
    data = device_status(s)
    if as_json:
        _echo_json(data)
        return
    for k in ("device_id", "repo_url", "channel", "groups", "cohort", "installed", "previous",
              "pending", "last_check", "last_result", "reason"):
        v = data[k]
        if k == "groups":
            v = ", ".join(v) or None
        click.echo(f"{k:12} {v if v not in (None, '') else '-'}")
    rb = data.get("last_rollback")
    if rb:
        click.echo(f"{'rollback':12} version {rb.get('version')} at {rb.get('at')}: "
                   f"{rb.get('reason')}")
    for v, why in data["blocked"].items():
        click.echo(f"{'blocked':12} {v}: {why}  (`edgepack agent unblock {v}`)")


@agent.command("unblock")
@click.argument("version")
@click.option("--state-dir", default=Path("/var/lib/edgepack"), show_default=True,
              envvar="EDGEPACK_STATE_DIR", show_envvar=True, type=click.Path(path_type=Path),
              help="The agent's state folder (slots, current, journal), as in the systemd "
              "units.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def agent_unblock(version: str, state_dir: Path, as_json: bool) -> None:
    """Allow a version that failed its health gate here to be tried again at the next cycle."""
    from edgepack.ota.agent.state import StateDir

    s = StateDir(state_dir)
    s.check()
    reason = s.unblock(version)
    if as_json:
        _echo_json({"unblocked": version, "reason_was": reason})
        return
    click.echo(f"version {version} unblocked (it was blocked because: {reason}); the next "
               "cycle may install it again")


COMMANDS = (repo, publish, agent)
