"""How long signed repository metadata stays valid, and how a repository remembers it.

Defaults (the timestamp is re-signed most often, so it expires first): timestamp 2 days,
snapshot 30, targets 90, root 365.
``repo init --timestamp-days/--snapshot-days/--targets-days`` stores other periods in
``DIR/expiry.json``; every later publish, rollout, rollback, gc and refresh signs with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from edgepack.errors import UsageError

ROOT_DAYS = 365
TARGETS_DAYS = 90
SNAPSHOT_DAYS = 30
TIMESTAMP_DAYS = 2
EXPIRY_FILE = "expiry.json"


@dataclass(frozen=True)
class Expiry:
    """How long freshly signed metadata stays valid (tests pass negative values)."""

    targets: timedelta = timedelta(days=TARGETS_DAYS)
    snapshot: timedelta = timedelta(days=SNAPSHOT_DAYS)
    timestamp: timedelta = timedelta(days=TIMESTAMP_DAYS)

    def to_dict(self) -> dict[str, float]:
        return {"targets_days": self.targets / timedelta(days=1),
                "snapshot_days": self.snapshot / timedelta(days=1),
                "timestamp_days": self.timestamp / timedelta(days=1)}

    @classmethod
    def from_days(cls, *, targets: float | None = None, snapshot: float | None = None,
                  timestamp: float | None = None) -> Expiry:
        """Periods in days (None: the default); raises UsageError for a period that is not
        positive or a timestamp that outlives the snapshot or the snapshot the targets."""
        d = cls()
        e = cls(timedelta(days=targets) if targets is not None else d.targets,
                timedelta(days=snapshot) if snapshot is not None else d.snapshot,
                timedelta(days=timestamp) if timestamp is not None else d.timestamp)
        for name, value in (("targets", e.targets), ("snapshot", e.snapshot),
                            ("timestamp", e.timestamp)):
            if value <= timedelta(0):
                raise UsageError(f"--{name}-days {value / timedelta(days=1):g} must be "
                                 "positive", hint="give a number of days, e.g. 2 or 0.5")
        if not e.timestamp <= e.snapshot <= e.targets:
            raise UsageError(
                f"expiry periods timestamp {e.timestamp} <= snapshot {e.snapshot} <= targets "
                f"{e.targets} do not hold",
                hint="the timestamp is re-signed most often, so it expires first")
        return e
