"""Scheduled ``repo refresh``: the systemd service + timer and the cron line ``repo init``
writes, so metadata never expires because nobody remembered to re-sign it.

The timer fires four times per timestamp period (every 12 h for the default 2 days), so two
missed runs in a row still leave a valid timestamp; ``Persistent=true`` catches up a run
missed while the host was off, and ``RandomizedDelaySec`` spreads hosts sharing a schedule
(systemd.timer(5): https://www.freedesktop.org/software/systemd/man/latest/systemd.timer.html).
"""

from __future__ import annotations

import shlex
import shutil
import sys
from datetime import timedelta
from pathlib import Path

SERVICE = "edgepack-repo-refresh.service"
TIMER = "edgepack-repo-refresh.timer"
# Hours that divide a day, so "every N hours" is one OnCalendar expression and one cron field.
_STEPS = (1, 2, 3, 4, 6, 12)


def refresh_every_hours(timestamp_period: timedelta) -> int:
    """How often to refresh: the largest step <= a quarter of the timestamp period (1 h at
    least, 24 h at most)."""
    quarter = timestamp_period / timedelta(hours=1) / 4
    if quarter >= 24:
        return 24
    return max([h for h in _STEPS if h <= quarter] or [1])


def edgepack_executable() -> str:
    """The absolute path of this installation's ``edgepack`` script (systemd wants one)."""
    beside = Path(sys.executable).parent / "edgepack"
    if beside.exists():
        return str(beside)
    return shutil.which("edgepack") or "/usr/local/bin/edgepack"


def refresh_units(repo_dir: Path, timestamp_period: timedelta,
                  executable: str | None = None) -> dict[str, str]:
    """``{file name: text}``: the service, the timer and ``cron`` (one crontab line)."""
    exe = executable or edgepack_executable()
    repo = Path(repo_dir).resolve()
    hours = refresh_every_hours(timestamp_period)
    calendar = "daily" if hours == 24 else f"*-*-* 00/{hours}:00:00"
    cron_hours = "0" if hours == 24 else f"*/{hours}"
    cmd = shlex.join([exe, "repo", "refresh", str(repo)])
    service = f"""\
# Re-signs the update repository's timestamp (and snapshot/targets near expiry) so devices
# keep trusting it. Written by `edgepack repo init`; install with:
#   cp {SERVICE} {TIMER} /etc/systemd/system/ && systemctl enable --now {TIMER}
[Unit]
Description=edgepack: re-sign the update repository's metadata before it expires

[Service]
Type=oneshot
ExecStart={cmd}
"""
    timer = f"""\
# Fires every {hours} h: four times per timestamp period ({timestamp_period}).
[Unit]
Description=edgepack: re-sign the update repository every {hours} h

[Timer]
OnCalendar={calendar}
Persistent=true
RandomizedDelaySec=10min

[Install]
WantedBy=timers.target
"""
    cron = f"{'0' if hours < 24 else '17'} {cron_hours} * * * {cmd}\n"
    return {SERVICE: service, TIMER: timer, "cron": cron}


def write_refresh_units(repo_dir: Path, timestamp_period: timedelta,
                        executable: str | None = None) -> dict[str, Path]:
    """Write the units into ``repo_dir/systemd/`` (never served); return their paths."""
    folder = Path(repo_dir) / "systemd"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, text in refresh_units(repo_dir, timestamp_period, executable).items():
        path = folder / (name if name != "cron" else "edgepack-repo-refresh.cron")
        path.write_text(text)
        out[name] = path
    return out
