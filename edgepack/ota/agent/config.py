"""What the device agent is told: repository, channel, limits and how to restart the server.

Device side: standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass


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
