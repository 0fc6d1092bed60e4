"""One update cycle of the device agent, and recovery from an interrupted one.

    refresh (ngclient) -> pick the newest release for this channel and cohort -> stage it
    (delta, verified) -> health gate side by side -> switch ``current`` -> commit;
    a failed gate -> roll back, record why, block the version.

When the old and the new server do not both fit in memory (``edgepack.ota.agent.memory``), the
gate is stop-swap-start instead: switch ``current``, restart the service (which stops the old
server and starts the new one), gate the service's server, and on failure switch back and
restart the old one.

The security decisions are python-tuf's (signatures, thresholds, expiry, rollback and
freeze attacks); this module orchestrates and keeps the journal so a kill -9 anywhere ends,
after restart, with a verified bundle behind ``current``.

Device side: tuf.ngclient, urllib3, standard library and edgepack's device modules only.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_exc

from edgepack import __version__
from edgepack.errors import (
    ConfigError,
    EdgepackError,
    FetchError,
    IntegrityError,
    RuntimeHealthError,
)
from edgepack.manifest import load_manifest
from edgepack.ota.agent.fetcher import Deadline, HttpFetcher, Progress, TufFetcher
from edgepack.ota.agent.health import (
    Launcher,
    ProcessHandle,
    SubprocessLauncher,
    check_server,
    gate,
)
from edgepack.ota.agent.installer import Stager
from edgepack.ota.agent.journal import Journal, JournalEntry, crash_point
from edgepack.ota.agent.memory import (
    STOP_SWAP_START,
    SwitchPlan,
    available_memory_bytes,
    bundle_memory_bytes,
    plan_switch,
)
from edgepack.ota.agent.outcome import (
    BLOCKED,
    CHANNEL_NOT_FOUND,
    FAILED,
    HELD_BACK,
    INSTALLED,
    ROLLED_BACK,
    UP_TO_DATE,
    ChannelNotFoundError,
)
from edgepack.ota.agent.report import NO_REPORTS, Reporter
from edgepack.ota.agent.state import StateDir, now_iso
from edgepack.ota.release import (
    channel_target,
    is_newer,
    offered_to,
    parse_channel_doc,
    parse_release,
    release_target,
    rollout_bucket,
    stored_target_path,
    version_key,
    version_text,
)

MAX_HEALTH_ATTEMPTS = 2
log = logging.getLogger("edgepack.agent")


@dataclass(frozen=True)
class AgentConfig:
    repo_url: str
    channel: str
    device_id: str | None = None
    deadline: float = 3600.0  # whole update, metadata included
    gap_timeout: float = 15.0  # longest silence from the server
    health_window: float = 180.0  # readiness + golden prompt
    restart_command: tuple[str, ...] = ()  # e.g. ("systemctl", "restart", "edgepack-server")
    serve_url: str | None = None  # the main server, checked after a restart
    # Memory the old and new servers may use together; None: what the machine has available.
    memory_budget_bytes: int | None = None
    groups: tuple[str, ...] = ()  # device groups named by `repo rollout --group`
    progress_every: float = 5.0  # seconds between download progress lines in the log


@dataclass
class CycleResult:
    result: str  # an outcome of edgepack.ota.agent.outcome
    version: int | str | None = None
    reason: str | None = None
    bytes_downloaded: int = 0
    details: dict[str, Any] = field(default_factory=dict)


def _tuf_call(fn, *args):
    """Run an ngclient call, mapping its errors onto edgepack's tree."""
    try:
        return fn(*args)
    except EdgepackError:
        raise
    except tuf_exc.DownloadLengthMismatchError as e:
        raise IntegrityError(f"repository metadata larger than allowed: {e}") from e
    except tuf_exc.DownloadError as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, EdgepackError):
            raise cause from e
        raise FetchError(f"cannot fetch update metadata: {e or type(e).__name__}",
                         hint="check --repo-url and the network; the agent retries later") from e
    except tuf_exc.RepositoryError as e:
        raise IntegrityError(
            f"update metadata rejected: {type(e).__name__}: {e}",
            hint="the repository is stale, tampered with or signed by unknown keys; "
            "nothing was installed",
        ) from e


class Agent:
    def __init__(self, state: StateDir, config: AgentConfig, *,
                 launcher: Launcher | None = None,
                 environ: Mapping[str, str] | None = None,
                 reporter: Reporter | None = None) -> None:
        self.state = state
        self.config = config
        self.reporter = reporter or NO_REPORTS
        self._last_outcome: str | None = None
        self.environ = dict(os.environ if environ is None else environ)
        self.launcher = launcher or SubprocessLauncher(log_dir=state.root / "logs",
                                                       environ=self.environ)
        self.journal = Journal(state.journal_path)

    # -- metadata --------------------------------------------------------------------------

    def _updater(self, http: HttpFetcher):
        from tuf.ngclient import Updater

        base = self.config.repo_url.rstrip("/")
        return _tuf_call(lambda: Updater(
            str(self.state.metadata), f"{base}/metadata/", None, f"{base}/targets/",
            fetcher=TufFetcher(http), bootstrap=self.state.trust.read_bytes()))

    def _fetch_target(self, updater, http: HttpFetcher, path: str) -> bytes:
        info = _tuf_call(updater.get_targetinfo, path)
        if info is None:
            raise IntegrityError(f"{path} is not in the repository's signed targets")
        url = (f"{self.config.repo_url.rstrip('/')}/targets/"
               f"{stored_target_path(path, info.hashes['sha256'])}")
        data = http.download_bytes(url, info.length)
        try:
            info.verify_length_and_hashes(data)
        except tuf_exc.LengthOrHashMismatchError as e:
            raise IntegrityError(
                f"{url} does not match its signed length/sha256: {e}",
                hint="the repository or a proxy serves a tampered file; it was rejected",
            ) from e
        return data

    def _device_id(self) -> str:
        return self.config.device_id or self.state.device_id()

    def _channels(self) -> list[str]:
        """The channels of the repository, from the targets metadata ngclient verified and
        stored during this refresh."""
        from tuf.api.metadata import Metadata, Targets

        try:
            md = Metadata[Targets].from_file(str(self.state.metadata / "targets.json"))
        except Exception:  # noqa: BLE001 - only used to word an error message
            return []
        return sorted(p[len("channels/"):-len(".json")] for p in md.signed.targets
                      if p.startswith("channels/") and p.endswith(".json"))

    def _choose(self, updater, http: HttpFetcher) -> tuple[int | str | None, str,
                                                           dict[str, Any]]:
        """(version to install or None, outcome if None, details).

        Newest first, a version newer than the installed one is taken when it is not
        blocked here and its signed rollout offers it to this device. A lower version is
        taken only when the signed channel names it as its ``rollback_to``.
        """
        target = channel_target(self.config.channel)
        if _tuf_call(updater.get_targetinfo, target) is None:
            raise ChannelNotFoundError(self.config.channel, self._channels())
        channel = parse_channel_doc(self._fetch_target(updater, http, target), target)
        installed = self.state.installed_version()
        blocked = self.state.blocked()
        device_id = self._device_id()
        skipped: dict[str, str] = {}
        kinds: list[str] = []
        details: dict[str, Any] = {"skipped": skipped, "cohort": rollout_bucket(device_id)}
        for v in sorted(channel.versions, key=version_key, reverse=True):
            downgrade = False
            if not is_newer(v, installed):
                if installed is None or version_key(v) == version_key(installed):
                    break
                if channel.rollback_to is None or \
                        version_key(channel.rollback_to) != version_key(v):
                    details["refused_downgrade"] = (
                        f"version {v} is lower than the installed {installed} and channel "
                        f"{self.config.channel!r} does not name it as its rollback_to")
                    break
                downgrade = True
            if version_text(v) in blocked:
                skipped[version_text(v)] = f"blocked: {blocked[version_text(v)]}"
                kinds.append(BLOCKED)
                continue
            info = _tuf_call(updater.get_targetinfo, release_target(self.config.channel, v))
            meta = ((info.custom or {}).get("edgepack") or {}) if info else {}
            if not meta:
                skipped[version_text(v)] = "no signed release entry"
                kinds.append(HELD_BACK)
                continue
            offered, why = offered_to(meta, device_id, self.config.groups)
            # A signed rollback reaches every device above it, whatever the rollout said:
            # those are the devices that must leave the withdrawn version.
            if not offered and not downgrade:
                skipped[version_text(v)] = why
                details.setdefault("rollout", meta.get("rollout"))
                details.setdefault("release_groups", meta.get("groups", []))
                kinds.append(HELD_BACK)
                continue
            need = meta.get("min_agent_version")
            if need and version_key(need) > version_key(__version__):
                skipped[version_text(v)] = f"needs agent >= {need}, this is {__version__}"
                kinds.append(HELD_BACK)
                continue
            details.update(rollout=meta.get("rollout"), offered=why if offered else
                           "signed channel rollback", downgrade=downgrade)
            return v, INSTALLED, details
        # The newest version this device did not take decides what to call the outcome.
        return None, (kinds[0] if kinds else UP_TO_DATE), details

    # -- one cycle -------------------------------------------------------------------------

    def _event(self, name: str, **fields: Any) -> None:
        self.reporter.event(name, {"channel": self.config.channel, **fields})

    def run_once(self) -> CycleResult:
        """Recover from an interrupted update, then check for and install one update.

        Raises ChannelNotFoundError (exit 3) when the channel does not exist, FetchError /
        IntegrityError / NoSpaceError when no update could be fetched (each recorded in
        status.json first); a bundle failing the health gate is not an error of the cycle:
        it is rolled back and reported as ``rolled-back``.
        """
        self.state.check()
        with self.state.locked():
            http: HttpFetcher | None = None
            self.state.record(last_check=now_iso(), channel=self.config.channel,
                              repo_url=self.config.repo_url, groups=list(self.config.groups),
                              cohort=rollout_bucket(self._device_id()))
            try:
                recovered = self.recover()
                if recovered is not None:
                    return self._finish(recovered)
                http = HttpFetcher(Deadline(self.config.deadline),
                                   gap_timeout=self.config.gap_timeout,
                                   user_agent=f"edgepack-agent/{__version__}")
                return self._finish(self._cycle(http))
            except EdgepackError as e:
                outcome = CHANNEL_NOT_FOUND if isinstance(e, ChannelNotFoundError) else FAILED
                self.state.record(last_result=outcome, reason=e.message,
                                  pending=None, error=type(e).__name__)
                if outcome != self._last_outcome:
                    self._event(outcome, reason=e.message, error=type(e).__name__)
                self._last_outcome = outcome
                self.reporter.state_changed()
                raise
            finally:
                if http is not None:
                    http.close()

    def _finish(self, result: CycleResult) -> CycleResult:
        # An install or rollback is always news; a repeated "up-to-date" every interval is
        # not (the retained state's last_check already says the device is alive).
        if result.result in (INSTALLED, ROLLED_BACK) or result.result != self._last_outcome:
            self._event(result.result, version=result.version, reason=result.reason,
                        bytes=result.bytes_downloaded)
        self._last_outcome = result.result
        self.reporter.state_changed()
        return result

    def _cycle(self, http: HttpFetcher) -> CycleResult:
        updater = self._updater(http)
        _tuf_call(updater.refresh)
        crash_point("after-refresh", self.environ)
        version, outcome, details = self._choose(updater, http)
        if version is None:
            installed = self.state.installed_version()
            skipped = details.get("skipped") or {}
            reason = "; ".join(f"version {v}: {why}" for v, why in skipped.items()) or \
                details.get("refused_downgrade")
            self.state.record(last_result=outcome, reason=reason, pending=None,
                              installed=installed, **details)
            return CycleResult(outcome, installed, reason=reason,
                               bytes_downloaded=http.traffic.bytes, details=details)
        release = parse_release(
            self._fetch_target(updater, http, release_target(self.config.channel, version)),
            release_target(self.config.channel, version))
        if version_key(release.version) != version_key(version) or \
                release.channel != self.config.channel:
            raise IntegrityError(f"release document for {version!r} describes "
                                 f"{release.channel}/{release.version!r}")
        log.info("update to version %s%s (%s)", version,
                 " (a signed channel rollback)" if details.get("downgrade") else "",
                 details.get("offered"))
        self._event("started", version=version, installed=self.state.installed_version(),
                    downgrade=bool(details.get("downgrade")))
        old = self.state.current_slot()
        old_prev = self.state.previous_slot()
        entry = JournalEntry(version, "fetching", old_slot=str(old) if old else None,
                             old_previous=str(old_prev) if old_prev else None)
        self.journal.write(entry)
        self.state.record(pending=version)
        crash_point("fetching", self.environ)
        http.progress = Progress(f"version {version}", every=self.config.progress_every)
        stager = Stager(self.state, http, self.config.repo_url,
                        lambda p: self._fetch_target(updater, http, p), self.environ)
        try:
            slot = stager.stage(release)
        except EdgepackError:
            self.journal.clear()  # partial files stay in staging/ and the chunk cache
            raise
        finally:
            http.progress.done()
            http.progress = None
        self._event("fetched", version=version, bytes=http.traffic.bytes,
                    chunks_downloaded=stager.stats.chunks_downloaded,
                    chunks_local=stager.stats.chunks_local)
        entry.step = "staged"
        self.journal.write(entry)
        crash_point("staged", self.environ)
        result = self._gate_and_switch(entry, slot)
        result.bytes_downloaded = http.traffic.bytes
        result.details.update(details, local_bytes=stager.stats.bytes_local,
                              chunks_downloaded=stager.stats.chunks_downloaded,
                              chunks_local=stager.stats.chunks_local)
        return result

    # -- health gate, switch, rollback -----------------------------------------------------

    def _switch_plan(self, entry: JournalEntry, slot: Path) -> SwitchPlan:
        """Side by side or stop-swap-start for this update (kept in the journal, so a
        recovery repeats the same choice whatever memory looks like after a crash)."""
        kept = entry.extra.get("switch")
        if isinstance(kept, dict):
            try:
                return SwitchPlan(**kept)
            except TypeError:
                pass
        old = Path(entry.old_slot) if entry.old_slot else None
        old_bytes = None
        if old is not None and old.is_dir():
            try:
                old_bytes = bundle_memory_bytes(load_manifest(old), old)
            except EdgepackError:
                old_bytes = None
        new_bytes = bundle_memory_bytes(load_manifest(slot), slot)
        budget = self.config.memory_budget_bytes
        return plan_switch(new_bytes, old_bytes, budget_bytes=budget,
                           available_bytes=available_memory_bytes() if budget is None else None)

    def _gate_and_switch(self, entry: JournalEntry, slot: Path) -> CycleResult:
        plan = self._switch_plan(entry, slot)
        if plan.mode == STOP_SWAP_START and not (self.config.restart_command
                                                 and self.config.serve_url):
            self.journal.clear()  # nothing was switched; the verified slot stays for later
            raise ConfigError(
                f"version {entry.version} needs stop-swap-start ({plan.why}), but the agent "
                "cannot stop and restart the server",
                hint="pass --restart-command (e.g. 'systemctl restart edgepack-server') and "
                "--serve-url, or a larger --memory-budget-bytes if the device has the memory",
            )
        entry.extra["switch"] = plan.to_dict()
        entry.step = "health"
        entry.attempts += 1
        self.journal.write(entry)
        if plan.mode == STOP_SWAP_START:
            # The service's own server is the gate: _switch restarts it on the new bundle
            # and checks readiness and the golden prompts; a failure switches back.
            crash_point("stop-swap-start", self.environ)
            return self._switch(entry, slot)
        manifest = load_manifest(slot)

        def started(handle: ProcessHandle) -> None:
            entry.server_pid = handle.pid
            self.journal.write(entry)
            crash_point("health-started", self.environ)

        try:
            gate(self.launcher, slot, manifest, self.config.health_window, on_start=started,
                 api_key=self._api_key())
        except RuntimeHealthError as e:
            return self._rollback(entry, slot, f"health gate: {e.message}")
        crash_point("health-passed", self.environ)
        entry.step = "switching"
        entry.server_pid = None
        self.journal.write(entry)
        return self._switch(entry, slot)

    def _api_key(self) -> str | None:
        # The servers read EDGEPACK_API_KEY (systemd: server.env) or the device-local config
        # (/etc/edgepack/server.toml, $EDGEPACK_CONFIG); the gate must send the same key.
        from edgepack.runtimes.local_config import local_api_key

        try:
            return local_api_key(self.environ)
        except EdgepackError as e:
            # The server will refuse the same file (exit 3) and the gate reports that.
            logging.getLogger("edgepack.agent").warning(
                "cannot read the API key from the device config: %s", e.message)
            return None

    def _restart_service(self) -> str | None:
        """Run --restart-command; return why it failed, or None.

        A failure is trusted (``systemctl restart`` of a Type=notify unit fails when the
        server exits before READY=1); a success is not: the health check that follows judges
        the server the service manager actually runs.
        """
        if not self.config.restart_command:
            return None
        cmd = list(self.config.restart_command)
        try:
            done = subprocess.run(cmd, check=False, capture_output=True, text=True,
                                  timeout=max(120.0, self.config.health_window))
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"the restart command {cmd[0]!r} failed: {e}"
        if done.returncode == 0:
            return None
        said = " ".join((done.stderr or done.stdout or "").split())[-300:]
        return (f"the restart command exited {done.returncode}"
                + (f": {said}" if said else ""))

    def _switch(self, entry: JournalEntry, slot: Path) -> CycleResult:
        old = Path(entry.old_slot) if entry.old_slot else None
        if old is not None and old.resolve() != slot.resolve():
            self.state.set_link(self.state.previous, old)
        crash_point("switch-previous", self.environ)
        self.state.set_link(self.state.current, slot)
        crash_point("switch-current", self.environ)
        failed = self._restart_service()
        where = ("stop-swap-start" if (entry.extra.get("switch") or {}).get("mode")
                 == STOP_SWAP_START else "after the switch")
        if failed:
            return self._rollback(entry, slot, f"{where}: {failed}")
        if self.config.serve_url:
            try:
                check_server(_RemoteServer(self.config.serve_url), load_manifest(slot),
                             self.config.health_window, api_key=self._api_key())
            except RuntimeHealthError as e:
                return self._rollback(entry, slot, f"{where}: {e.message}")
        entry.step = "committed"
        self.journal.write(entry)
        crash_point("committed", self.environ)
        return self._commit(entry)

    def _commit(self, entry: JournalEntry) -> CycleResult:
        self._event("health", version=entry.version, passed=True,
                    mode=(entry.extra.get("switch") or {}).get("mode"))
        removed = self.state.gc()
        crash_point("gc", self.environ)
        self.journal.clear()
        prev = self.state.previous_slot()
        switch = entry.extra.get("switch")
        log.info("version %s installed and committed", entry.version)
        self.state.record(last_result=INSTALLED, reason=None, pending=None,
                          installed=entry.version, previous=prev.name if prev else None,
                          switch=switch)
        return CycleResult(INSTALLED, entry.version,
                           details={"removed_slots": removed, "switch": switch})

    def _rollback(self, entry: JournalEntry, slot: Path, reason: str) -> CycleResult:
        entry.step = "rollback"
        entry.reason = reason
        self.journal.write(entry)
        # Blocked first: whatever happens next, this version is never retried on its own.
        self.state.block(entry.version, reason)
        self._event("health", version=entry.version, passed=False, reason=reason)
        crash_point("rollback", self.environ)
        old = Path(entry.old_slot) if entry.old_slot else None
        cur = self.state.current_slot()
        if cur is not None and cur.resolve() == slot.resolve():
            self.state.set_link(self.state.current, old)
            self.state.set_link(self.state.previous,
                                Path(entry.old_previous) if entry.old_previous else None)
            failed = self._restart_service()
            if self.config.serve_url and old is not None and self.config.restart_command:
                # Say so when the old bundle does not come back either (nothing more can be
                # done here; the service manager keeps restarting it).
                try:
                    if failed:
                        raise RuntimeHealthError(failed)
                    check_server(_RemoteServer(self.config.serve_url), load_manifest(old),
                                 self.config.health_window, api_key=self._api_key())
                except (RuntimeHealthError, IntegrityError) as e:
                    reason += f"; the previous bundle did not come back: {e.message}"
        if slot.exists() and (old is None or slot.resolve() != old.resolve()):
            shutil.rmtree(slot, ignore_errors=True)
        self.journal.clear()
        switch = entry.extra.get("switch")
        log.warning("version %s rolled back: %s", entry.version, reason)
        self.state.record(last_result=ROLLED_BACK, reason=reason, pending=None,
                          failed_version=entry.version,
                          last_rollback={"version": entry.version, "reason": reason,
                                         "at": now_iso()},
                          installed=self.state.installed_version(), switch=switch)
        return CycleResult(ROLLED_BACK, entry.version, reason=reason,
                           details={"switch": switch})

    # -- recovery --------------------------------------------------------------------------

    def _reap(self, pid: int | None, slot: Path) -> None:
        """Stop a health-gate server left by a killed agent (normally gone already through
        PR_SET_PDEATHSIG); the pid is only killed if it still runs this slot."""
        if not pid:
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            return
        if str(slot).encode() in cmdline:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass

    def recover(self) -> CycleResult | None:
        """Finish or roll back an update interrupted by a kill or power loss.

        Returns the result of a finished/rolled back update, or None when there was nothing
        to do (a partial download is simply resumed by the next cycle).
        """
        entry = self.journal.read()
        if entry is None:
            return None
        slot = self.state.slot(entry.version)
        self._reap(entry.server_pid, slot)
        if entry.step == "fetching":
            self.journal.clear()
            return None
        if entry.step == "rollback":
            return self._rollback(entry, slot, entry.reason or "interrupted rollback")
        if entry.step == "committed":
            return self._commit(entry)
        if not self.state.verified(slot):
            # The slot went bad (power loss before fsync?): undo any switch, retry later.
            cur = self.state.current_slot()
            if cur is not None and cur.resolve() == slot.resolve() and entry.old_slot:
                self.state.set_link(self.state.current, Path(entry.old_slot))
            shutil.rmtree(slot, ignore_errors=True)
            self.journal.clear()
            return None
        if entry.step == "switching":
            return self._switch(entry, slot)
        if entry.step == "health" and entry.attempts >= MAX_HEALTH_ATTEMPTS:
            return self._rollback(entry, slot, f"health gate interrupted {entry.attempts} "
                                  "times (the bundle may crash the device)")
        return self._gate_and_switch(entry, slot)  # staged, or health interrupted once


@dataclass
class _RemoteServer:
    """The main server, already running under its service manager."""

    url: str
    pid: int = 0

    def alive(self) -> bool:
        return True

    def stop(self) -> None:
        pass

