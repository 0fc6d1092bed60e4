"""What one agent cycle ended with, and the exit code ``agent run --once`` gives it.

An operator must be able to tell from the exit code alone whether a device is current, was
updated, is waiting for a rollout, refuses a blocked version, follows a channel that does not
exist, or failed. Errors keep the codes of DESIGN.md (3 config, 4 fetch, 6 integrity,
7 runtime/health); outcomes that are not errors but are not "nothing to do" either get codes
from 10 up, outside that table, the way ``yum check-update`` answers 100 for "updates exist".

Device side: standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgepack.errors import EXIT_CONFIG, EXIT_OK, EXIT_RUNTIME, ConfigError

UP_TO_DATE = "up-to-date"
INSTALLED = "installed"
HELD_BACK = "held-back"
BLOCKED = "blocked"
ROLLED_BACK = "rolled-back"
CHANNEL_NOT_FOUND = "channel-not-found"
FAILED = "failed"

EXIT_INSTALLED = 10
EXIT_HELD_BACK = 11
EXIT_BLOCKED = 12

# outcome -> (exit code of `agent run --once`, one line for --help and the README)
OUTCOMES: dict[str, tuple[int, str]] = {
    UP_TO_DATE: (EXIT_OK, "the device runs the newest version meant for it"),
    INSTALLED: (EXIT_INSTALLED, "a new version was installed, health-gated and committed"),
    HELD_BACK: (EXIT_HELD_BACK, "a newer version exists, but its rollout (percentage and "
                "groups) does not include this device yet, or it needs a newer agent"),
    BLOCKED: (EXIT_BLOCKED, "a newer version exists, but it failed here before and is "
              "blocked (`edgepack agent unblock VERSION`)"),
    ROLLED_BACK: (EXIT_RUNTIME, "a new version failed its health gate and was rolled back"),
    CHANNEL_NOT_FOUND: (EXIT_CONFIG, "the channel does not exist in the signed repository"),
    FAILED: (-1, "no update could be fetched or verified: the error's own exit code "
             "(4 fetch/network, 6 integrity/signature, 3 configuration)"),
}


@dataclass
class CycleResult:
    """How one agent cycle ended: an outcome above, the version it concerns, and why."""

    result: str
    version: int | str | None = None
    reason: str | None = None
    bytes_downloaded: int = 0
    details: dict[str, Any] = field(default_factory=dict)


def exit_code(outcome: str) -> int:
    return OUTCOMES[outcome][0]


class ChannelNotFoundError(ConfigError):
    """The channel the agent follows is not in the repository's signed targets."""

    def __init__(self, channel: str, existing: list[str]) -> None:
        have = ", ".join(existing) if existing else "none"
        super().__init__(
            f"channel {channel!r} does not exist in the repository (channels: {have})",
            hint="fix --channel (EDGEPACK_CHANNEL in /etc/edgepack/agent.env), or publish to "
            f"it with `edgepack publish BUNDLE --repo DIR --channel {channel}`",
        )
        self.channel = channel
        self.existing = existing
