"""The device's update agent on the command line: ``agent init``, ``run``, ``status`` and
``unblock``.

Commands parse, call ``edgepack.ota.agent`` and render; imports happen inside the commands so
``edgepack agent`` runs on a device with only the device extras (``edgepack[agent]``).
Outcomes and exit codes: ``edgepack.ota.agent.outcome``.
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
    from edgepack.ota.agent.config import AgentConfig
    from edgepack.ota.agent.loop import AgentStopped, StopSignal, run_forever
    from edgepack.ota.agent.outcome import exit_code
    from edgepack.ota.agent.state import StateDir
    from edgepack.ota.agent.updater import Agent
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
