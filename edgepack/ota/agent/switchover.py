"""Putting a staged, verified bundle into service: health gate, switch ``current``, commit;
or roll back, record why and block the version. Also the recovery of an update a kill or
power loss interrupted, from the journal.

Side by side: the new bundle's server is gated next to the old one, then ``current`` is
switched and the service restarted. When the two servers do not both fit in memory
(``edgepack.ota.agent.memory``) it is stop-swap-start instead: switch ``current``, restart the
service (which stops the old server and starts the new one), gate the service's server, and on
failure switch back and restart the old one. Every step is journalled first, so a kill -9
anywhere ends, after restart, with a verified bundle behind ``current``.

Device side: standard library and edgepack's device modules only.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from edgepack.errors import ConfigError, EdgepackError, IntegrityError, RuntimeHealthError
from edgepack.manifest import load_manifest
from edgepack.ota.agent.config import AgentConfig
from edgepack.ota.agent.health import Launcher, ProcessHandle, check_server, gate
from edgepack.ota.agent.journal import Journal, JournalEntry, crash_point
from edgepack.ota.agent.memory import (
    STOP_SWAP_START,
    SwitchPlan,
    available_memory_bytes,
    bundle_memory_bytes,
    plan_switch,
)
from edgepack.ota.agent.outcome import INSTALLED, ROLLED_BACK, CycleResult
from edgepack.ota.agent.state import StateDir, now_iso

MAX_HEALTH_ATTEMPTS = 2
log = logging.getLogger("edgepack.agent")


@dataclass
class Switchover:
    """Gates, switches, commits or rolls back the update the journal describes.

    ``event(name, **fields)`` reports the health result (passed or not) to the reporter.
    """

    state: StateDir
    config: AgentConfig
    journal: Journal
    launcher: Launcher
    environ: Mapping[str, str]
    event: Callable[..., None]

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

    def gate_and_switch(self, entry: JournalEntry, slot: Path) -> CycleResult:
        """Health-gate the staged ``slot`` and switch to it, or roll it back."""
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
            # The service's own server is the gate: switch restarts it on the new bundle
            # and checks readiness and the golden prompts; a failure switches back.
            crash_point("stop-swap-start", self.environ)
            return self.switch(entry, slot)
        manifest = load_manifest(slot)

        def started(handle: ProcessHandle) -> None:
            entry.server_pid = handle.pid
            self.journal.write(entry)
            crash_point("health-started", self.environ)

        try:
            gate(self.launcher, slot, manifest, self.config.health_window, on_start=started,
                 api_key=self._api_key())
        except RuntimeHealthError as e:
            return self.rollback(entry, slot, f"health gate: {e.message}")
        crash_point("health-passed", self.environ)
        entry.step = "switching"
        entry.server_pid = None
        self.journal.write(entry)
        return self.switch(entry, slot)

    def _api_key(self) -> str | None:
        # The servers read EDGEPACK_API_KEY (systemd: server.env) or the device-local config
        # (/etc/edgepack/server.toml, $EDGEPACK_CONFIG); the gate must send the same key.
        from edgepack.runtimes.local_config import local_api_key

        try:
            return local_api_key(self.environ)
        except EdgepackError as e:
            # The server will refuse the same file (exit 3) and the gate reports that.
            log.warning("cannot read the API key from the device config: %s", e.message)
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

    def switch(self, entry: JournalEntry, slot: Path) -> CycleResult:
        """Point ``current`` at ``slot``, restart the service and check its server."""
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
            return self.rollback(entry, slot, f"{where}: {failed}")
        if self.config.serve_url:
            try:
                check_server(_RemoteServer(self.config.serve_url), load_manifest(slot),
                             self.config.health_window, api_key=self._api_key())
            except RuntimeHealthError as e:
                return self.rollback(entry, slot, f"{where}: {e.message}")
        entry.step = "committed"
        self.journal.write(entry)
        crash_point("committed", self.environ)
        return self.commit(entry)

    def commit(self, entry: JournalEntry) -> CycleResult:
        """Record the switched version as installed, collect old slots, clear the journal."""
        self.event("health", version=entry.version, passed=True,
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

    def rollback(self, entry: JournalEntry, slot: Path, reason: str) -> CycleResult:
        """Block the version, switch back to the old slot if needed, remove ``slot``."""
        entry.step = "rollback"
        entry.reason = reason
        self.journal.write(entry)
        # Blocked first: whatever happens next, this version is never retried on its own.
        self.state.block(entry.version, reason)
        self.event("health", version=entry.version, passed=False, reason=reason)
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
            return self.rollback(entry, slot, entry.reason or "interrupted rollback")
        if entry.step == "committed":
            return self.commit(entry)
        if not self.state.verified(slot):
            # The slot went bad (power loss before fsync?): undo any switch, retry later.
            cur = self.state.current_slot()
            if cur is not None and cur.resolve() == slot.resolve() and entry.old_slot:
                self.state.set_link(self.state.current, Path(entry.old_slot))
            shutil.rmtree(slot, ignore_errors=True)
            self.journal.clear()
            return None
        if entry.step == "switching":
            return self.switch(entry, slot)
        if entry.step == "health" and entry.attempts >= MAX_HEALTH_ATTEMPTS:
            return self.rollback(entry, slot, f"health gate interrupted {entry.attempts} "
                                 "times (the bundle may crash the device)")
        return self.gate_and_switch(entry, slot)  # staged, or health interrupted once


@dataclass
class _RemoteServer:
    """The main server, already running under its service manager."""

    url: str
    pid: int = 0

    def alive(self) -> bool:
        return True

    def stop(self) -> None:
        pass
