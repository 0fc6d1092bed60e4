"""Commands for over-the-air updates: ``repo``, ``publish`` and ``agent``.

Each command parses, calls into ``edgepack.ota.repo`` (build side) or ``edgepack.ota.agent`` (device
side), and renders. Imports happen inside the commands so ``edgepack agent`` runs on a device
without the build extras.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import click

from edgepack.errors import EdgepackError, RuntimeHealthError


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


@click.group("repo")
def repo() -> None:
    """Create and maintain a static, signed update repository (TUF)."""


@repo.command("init")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--threshold", default=1, show_default=True, type=int,
              help="Number of root keys made; all of them must sign a new root.")
@click.option("--root-key", type=click.Path(path_type=Path), default=None,
              help="Write the root private key here (keep it offline) instead of DIR/keys.")
def repo_init(directory: Path, threshold: int, root_key: Path | None) -> None:
    """Create an empty repository in DIRECTORY with fresh ed25519 keys.

    Serve DIRECTORY/public (nginx, S3, a CDN); never serve DIRECTORY/keys.
    """
    from edgepack.ota.repo import init_repo

    r = init_repo(directory, threshold=threshold, root_key=root_key)
    click.echo(f"repository created in {r.root}")
    click.echo(f"  serve:        {r.public}")
    click.echo(f"  trusted root: {r.root_json()}  (give it to `edgepack agent init --root`)")
    click.echo(f"  keys:         {r.keys}{'' if root_key is None else f', root: {root_key}'}")


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
@click.option("--percent", required=True, type=click.IntRange(0, 100),
              help="New rollout percentage (0-100).")
def repo_rollout(directory: Path, channel: str, version: str, percent: int) -> None:
    """Widen or narrow the rollout of a published version."""
    from edgepack.ota.repo import Repository

    v: int | str = int(version) if version.isdigit() else version
    Repository(directory).set_rollout(channel, v, percent)
    click.echo(f"{channel} {version}: rollout {percent}%")


@repo.command("gc")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--keep", required=True, type=click.IntRange(1),
              help="Versions kept per channel (newest first; the newest version rolled out "
              "to 100% also stays).")
@click.option("--dry-run", is_flag=True, help="Report what would be deleted; change nothing.")
def repo_gc(directory: Path, keep: int, dry_run: bool) -> None:
    """Drop older versions from each channel and delete files and chunks nothing uses.

    Re-signs targets, snapshot and timestamp when a version is dropped. Prints JSON.
    """
    from edgepack.ota.repo import Repository
    from edgepack.ota.retention import collect_garbage

    _echo_json(collect_garbage(Repository(directory), keep, dry_run=dry_run).to_dict())


@repo.command("show")
@click.argument("directory", type=click.Path(path_type=Path))
def repo_show(directory: Path) -> None:
    """List channels, versions and rollouts (JSON)."""
    from edgepack.ota.repo import Repository, describe

    _echo_json(describe(Repository(directory)))


@click.command("publish")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--repo", "repo_dir", required=True, type=click.Path(path_type=Path),
              help="Repository folder made by `edgepack repo init`.")
@click.option("--channel", required=True, help="Channel name, e.g. stable or beta.")
@click.option("--rollout", default=100, show_default=True, type=click.IntRange(0, 100),
              help="Percentage of devices (by stable hash of device id) offered this version.")
@click.option("--min-agent-version", default=None,
              help="Oldest agent that may install it (default: this edgepack's version).")
def publish(bundle: Path, repo_dir: Path, channel: str, rollout: int,
            min_agent_version: str | None) -> None:
    """Add BUNDLE as the newest version of a channel (chunked, signed)."""
    from edgepack.ota.repo import Repository

    r = Repository(repo_dir).publish(bundle, channel, rollout=rollout,
                                     min_agent_version=min_agent_version)
    click.echo(f"published {channel} version {r.version} ({r.files} files, {r.chunks_new} new "
               f"of {r.chunks_total} chunks, {r.bytes_new} new chunk bytes)")


@click.group("agent")
def agent() -> None:
    """The device's update agent."""


@agent.command("init")
@click.option("--root", "root_json", required=True, type=click.Path(path_type=Path,
              exists=True, dir_okay=False), help="The repository's trusted root.json.")
@click.option("--state-dir", required=True, type=click.Path(path_type=Path),
              help="Where the agent keeps slots, journal and caches.")
@click.option("--device-id", default=None, help="This device's id (default: a random UUID).")
def agent_init(root_json: Path, state_dir: Path, device_id: str | None) -> None:
    """Provision a device with the repository's trusted root."""
    from edgepack.ota.agent.state import StateDir

    s = StateDir(state_dir)
    s.init(root_json.read_bytes(), device_id)
    click.echo(f"provisioned {s.root} (device id {s.device_id()})")


@agent.command("run")
@click.option("--repo-url", required=True, help="Base URL serving the repository's public/.")
@click.option("--state-dir", required=True, type=click.Path(path_type=Path))
@click.option("--channel", required=True, help="Channel to follow.")
@click.option("--device-id", default=None, help="Override the provisioned device id.")
@click.option("--once", is_flag=True,
              help="One cycle, then exit with its status (7 when the update was rolled back).")
@click.option("--interval", default=900.0, show_default=True, type=float,
              help="Seconds between cycles.")
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
def agent_run(repo_url: str, state_dir: Path, channel: str, device_id: str | None, once: bool,
              interval: float, deadline: float, gap_timeout: float, health_window: float,
              restart_command: str | None, serve_url: str | None,
              memory_budget_bytes: int | None) -> None:
    """Check for, fetch, verify, health-gate and switch to new bundles.

    A new bundle starts side by side on a free port when it fits in memory beside the running
    one, else stop-swap-start (see --memory-budget-bytes). A bundle that fails readiness or
    its golden prompts is rolled back, its version blocked, and the reason recorded for
    `edgepack agent status`.
    """
    from edgepack.ota.agent.state import StateDir
    from edgepack.ota.agent.updater import Agent, AgentConfig
    from edgepack.ota.release import check_channel

    config = AgentConfig(
        repo_url=repo_url, channel=check_channel(channel), device_id=device_id,
        deadline=deadline, gap_timeout=gap_timeout, health_window=health_window,
        restart_command=tuple(shlex.split(restart_command)) if restart_command else (),
        serve_url=serve_url, memory_budget_bytes=memory_budget_bytes)
    a = Agent(StateDir(state_dir), config)
    while True:
        try:
            r = a.run_once()
            msg = f"{r.result}" + (f" version {r.version}" if r.version is not None else "")
            click.echo(msg + (f": {r.reason}" if r.reason else "")
                       + f" ({r.bytes_downloaded} bytes downloaded)")
        except EdgepackError as e:
            if once:
                raise
            click.echo(f"error: {e.render()}", err=True)
        if once:
            if r.result == "rolled-back":
                raise click.exceptions.Exit(RuntimeHealthError.exit_code)
            return
        time.sleep(interval)


@agent.command("status")
@click.option("--state-dir", required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def agent_status(state_dir: Path, as_json: bool) -> None:
    """Installed, previous, pending, last result and why."""
    from edgepack.ota.agent.journal import Journal
    from edgepack.ota.agent.state import StateDir

    s = StateDir(state_dir)
    s.check()
    cur, prev = s.current_slot(), s.previous_slot()
    entry = Journal(s.journal_path).read()
    st = s.status()
    data = {
        "installed": s.installed_version(),
        "current_slot": str(cur) if cur else None,
        "previous": prev.name if prev else None,
        "pending": entry.version if entry else st.get("pending"),
        "pending_step": entry.step if entry else None,
        "last_result": st.get("last_result"),
        "reason": st.get("reason"),
        "at": st.get("at"),
        "blocked": s.blocked(),
        "device_id": s.device_id(),
        "switch": st.get("switch"),
    }
    if as_json:
        _echo_json(data)
        return
    for k in ("installed", "previous", "pending", "last_result", "reason", "at"):
        click.echo(f"{k:12} {data[k] if data[k] is not None else '-'}")
    blocked: dict[str, str] = s.blocked()
    for v, why in blocked.items():
        click.echo(f"blocked      {v}: {why}")


COMMANDS = (repo, publish, agent)
