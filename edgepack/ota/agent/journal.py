"""The journal of the update in progress, and the crash-test hook.

The journal is one JSON file written atomically before each step that changes what the
device would run. On start the agent reads it and finishes or rolls back (``Switchover.recover``):

    fetching   staging/<v> is being filled     -> keep partial files, resume next cycle
    staged     slots/<v> is complete, verified -> run the health gate again
    health     the gate was running            -> retry once, then block the version
    switching  the gate passed                 -> finish the switch (roll forward)
    rollback   the gate failed                 -> finish the rollback
    committed  the switch is done              -> garbage-collect and clear the journal

Device side: standard library only.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgepack.ota.agent.state import read_json, write_json_atomic

STEPS = ("fetching", "staged", "health", "switching", "rollback", "committed")

# Test hook (named as such): EDGEPACK_AGENT_CRASH_AT=<point> makes the agent SIGKILL itself
# at that point, so tests exercise kill -9 at exact steps. Unset in production.
CRASH_ENV = "EDGEPACK_AGENT_CRASH_AT"


@dataclass
class JournalEntry:
    version: int | str
    step: str
    old_slot: str | None = None  # the slot `current` pointed to when the update began
    old_previous: str | None = None
    attempts: int = 0  # health-gate attempts for this version
    reason: str | None = None
    server_pid: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> JournalEntry | None:
        data = read_json(self.path, None)
        if not isinstance(data, dict) or data.get("step") not in STEPS:
            return None
        known = {k: data[k] for k in JournalEntry.__dataclass_fields__ if k in data}
        return JournalEntry(**known)

    def write(self, entry: JournalEntry) -> None:
        write_json_atomic(self.path, asdict(entry))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def crash_point(name: str, environ: Mapping[str, str]) -> None:
    """Test hook: SIGKILL this process if ``EDGEPACK_AGENT_CRASH_AT`` names this point."""
    if environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
