"""Which release this device takes from its channel: a pure decision, no files, no network.

Newest first, a version newer than the installed one is taken when it is not blocked here, its
signed rollout offers it to this device and this agent is new enough for it. A lower version is
taken only when the signed channel names it as its ``rollback_to``.

Device side: standard library and edgepack's device modules only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgepack import __version__
from edgepack.ota.agent.outcome import BLOCKED, HELD_BACK, INSTALLED, UP_TO_DATE
from edgepack.ota.release import (
    Channel,
    is_newer,
    offered_to,
    rollout_bucket,
    version_key,
    version_text,
)


@dataclass(frozen=True)
class Choice:
    """The version to install (None: nothing), the outcome when there is none, and what was
    considered (skipped versions and why, cohort, rollout) for status.json and the log."""

    version: int | str | None
    outcome: str
    details: dict[str, Any] = field(default_factory=dict)


def choose_release(channel: Channel, channel_name: str, *, installed: int | str | None,
                   blocked: Mapping[str, str], device_id: str, groups: tuple[str, ...],
                   release_meta: Callable[[int | str], dict[str, Any]],
                   agent_version: str = __version__) -> Choice:
    """Pick the release to install from ``channel``.

    ``release_meta(version)`` returns the signed ``edgepack`` entry of that version's release
    target ({} when there is none); it is asked only for the versions actually considered.
    """
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
                    f"{channel_name!r} does not name it as its rollback_to")
                break
            downgrade = True
        if version_text(v) in blocked:
            skipped[version_text(v)] = f"blocked: {blocked[version_text(v)]}"
            kinds.append(BLOCKED)
            continue
        meta = release_meta(v)
        if not meta:
            skipped[version_text(v)] = "no signed release entry"
            kinds.append(HELD_BACK)
            continue
        offered, why = offered_to(meta, device_id, groups)
        # A signed rollback reaches every device above it, whatever the rollout said:
        # those are the devices that must leave the withdrawn version.
        if not offered and not downgrade:
            skipped[version_text(v)] = why
            details.setdefault("rollout", meta.get("rollout"))
            details.setdefault("release_groups", meta.get("groups", []))
            kinds.append(HELD_BACK)
            continue
        need = meta.get("min_agent_version")
        if need and version_key(need) > version_key(agent_version):
            skipped[version_text(v)] = f"needs agent >= {need}, this is {agent_version}"
            kinds.append(HELD_BACK)
            continue
        details.update(rollout=meta.get("rollout"), offered=why if offered else
                       "signed channel rollback", downgrade=downgrade)
        return Choice(v, INSTALLED, details)
    # The newest version this device did not take decides what to call the outcome.
    return Choice(None, kinds[0] if kinds else UP_TO_DATE, details)
