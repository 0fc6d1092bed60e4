"""Read-only views of an update repository for the publisher: its channels (``repo show``)
and when its signed metadata expires (``repo show`` warnings, ``repo show --expiry``).

Build side, like ``edgepack.ota.repo``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from edgepack.ota.repo import ROOT_DAYS, Repository, _now


def describe(repo: Repository) -> dict[str, Any]:
    """A JSON-able summary: channels, versions, rollouts and groups."""
    _, _, targets = repo._current()
    out: dict[str, Any] = {}
    for path, info in sorted(targets.signed.targets.items()):
        if path.startswith("releases/"):
            meta = (info.unrecognized_fields.get("custom") or {}).get("edgepack", {})
            channel = meta.get("channel", "?")
            if meta.get("version") not in repo._channel(targets, channel).versions:
                continue  # withdrawn by a rollback
            entry = {"version": meta.get("version"), "rollout": meta.get("rollout")}
            if meta.get("groups"):
                entry["groups"] = meta["groups"]
            out.setdefault(channel, []).append(entry)
    return out


def expiry_report(repo: Repository, now: datetime | None = None) -> list[dict[str, Any]]:
    """When each signed role expires, and whether that is near: within a day, or within a
    quarter of the role's configured period (a missed refresh timer shows up in time)."""
    timestamp, snapshot, targets = repo._current()
    root = repo._load("root")
    periods = repo.expiry()
    now = now or _now()
    out = []
    for role, md, period in (("timestamp", timestamp, periods.timestamp),
                             ("snapshot", snapshot, periods.snapshot),
                             ("targets", targets, periods.targets),
                             ("root", root, timedelta(days=ROOT_DAYS))):
        left = md.signed.expires - now
        out.append({"role": role, "expires": md.signed.expires.isoformat(),
                    "seconds_left": int(left.total_seconds()),
                    "near": left <= max(timedelta(days=1), period / 4),
                    "expired": left <= timedelta(0)})
    return out
