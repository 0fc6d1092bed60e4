"""One update cycle of the device agent, and recovery from an interrupted one.

    refresh (ngclient) -> pick the newest release for this channel and cohort -> stage it
    (delta, verified) -> health gate side by side -> switch ``current`` -> commit;
    a failed gate -> roll back, record why, block the version.

This module orchestrates; the parts live next to it: ``signed_repo`` (ngclient: refresh and
verified targets), ``selection`` (which release to take, a pure decision), ``installer``
(staging), ``switchover`` (health gate, switch, commit, rollback and recovery from the
journal, so a kill -9 anywhere ends, after restart, with a verified bundle behind ``current``).

Device side: tuf.ngclient, urllib3, standard library and edgepack's device modules only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from edgepack import __version__
from edgepack.errors import EdgepackError, IntegrityError
from edgepack.ota.agent.config import AgentConfig
from edgepack.ota.agent.fetcher import Deadline, HttpFetcher, Progress
from edgepack.ota.agent.health import Launcher, SubprocessLauncher
from edgepack.ota.agent.installer import Stager
from edgepack.ota.agent.journal import Journal, JournalEntry, crash_point
from edgepack.ota.agent.outcome import (
    CHANNEL_NOT_FOUND,
    FAILED,
    INSTALLED,
    ROLLED_BACK,
    ChannelNotFoundError,
    CycleResult,
)
from edgepack.ota.agent.report import NO_REPORTS, Reporter
from edgepack.ota.agent.selection import Choice, choose_release
from edgepack.ota.agent.signed_repo import SignedRepo
from edgepack.ota.agent.state import StateDir, now_iso
from edgepack.ota.agent.switchover import Switchover
from edgepack.ota.release import (
    channel_target,
    parse_channel_doc,
    parse_release,
    release_target,
    rollout_bucket,
    version_key,
)

log = logging.getLogger("edgepack.agent")


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
        self.switchover = Switchover(state, config, self.journal, self.launcher,
                                     self.environ, self._event)

    def _device_id(self) -> str:
        return self.config.device_id or self.state.device_id()

    def _choose(self, repo: SignedRepo) -> Choice:
        """The release to install from the channel's signed document (see ``selection``)."""
        target = channel_target(self.config.channel)
        if repo.target_info(target) is None:
            raise ChannelNotFoundError(self.config.channel, repo.channels())
        channel = parse_channel_doc(repo.fetch(target), target)

        def release_meta(version: int | str) -> dict[str, Any]:
            info = repo.target_info(release_target(self.config.channel, version))
            return ((info.custom or {}).get("edgepack") or {}) if info else {}

        return choose_release(channel, self.config.channel,
                              installed=self.state.installed_version(),
                              blocked=self.state.blocked(), device_id=self._device_id(),
                              groups=self.config.groups, release_meta=release_meta)

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
                recovered = self.switchover.recover()
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
        repo = SignedRepo(self.state, self.config.repo_url, http)
        repo.refresh()
        crash_point("after-refresh", self.environ)
        choice = self._choose(repo)
        version, outcome, details = choice.version, choice.outcome, choice.details
        if version is None:
            installed = self.state.installed_version()
            skipped = details.get("skipped") or {}
            reason = "; ".join(f"version {v}: {why}" for v, why in skipped.items()) or \
                details.get("refused_downgrade")
            self.state.record(last_result=outcome, reason=reason, pending=None,
                              installed=installed, **details)
            return CycleResult(outcome, installed, reason=reason,
                               bytes_downloaded=http.traffic.bytes, details=details)
        release = parse_release(repo.fetch(release_target(self.config.channel, version)),
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
        stager = Stager(self.state, http, self.config.repo_url, repo.fetch, self.environ)
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
        result = self.switchover.gate_and_switch(entry, slot)
        result.bytes_downloaded = http.traffic.bytes
        result.details.update(details, local_bytes=stager.stats.bytes_local,
                              chunks_downloaded=stager.stats.chunks_downloaded,
                              chunks_local=stager.stats.chunks_local)
        return result
