"""The system half of an install: the ``edgepack`` user and the systemd units.

The server and agent units (``edgepack.runtimes.systemd``) run as a dedicated system user
``edgepack`` that owns the state directory. Units are rendered for this install's venv and
state directory and written to ``/etc/systemd/system``; systemd is detected the way
``sd_booted(3)`` does (``/run/systemd/system`` exists), so a container or chroot without it
gets a clear message and the command to start the server by hand instead.

Device side: standard library, edgepack.errors and edgepack.runtimes.systemd only.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgepack.errors import ConfigError, RuntimeHealthError

USER = "edgepack"


def systemd_running(root: Path = Path("/")) -> bool:
    """sd_booted(3): systemd is PID 1 when /run/systemd/system is a directory."""
    return (root / "run" / "systemd" / "system").is_dir() and shutil.which("systemctl") is not None


def ensure_user(state_dir: Path, log: Callable[[str], None]) -> tuple[int, int]:
    """Create the ``edgepack`` system user (no login, home = the state dir) if missing;
    return its uid and gid. Raises ConfigError when that is impossible (not root)."""
    try:
        pw = pwd.getpwnam(USER)
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        pass
    if os.geteuid() != 0:
        raise ConfigError(
            f"the system user {USER!r} does not exist and only root can create it",
            hint="run the install with sudo, or pass --no-user to run as yourself",
        )
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    nologin = next((p for p in ("/usr/sbin/nologin", "/sbin/nologin") if Path(p).exists()),
                   "/bin/false")
    cmd = [useradd, "--system", "--user-group", "--home-dir", str(state_dir),
           "--no-create-home", "--shell", nologin, USER]
    log(" ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"could not create the user {USER!r}: {proc.stderr.strip()}",
                          hint="create it by hand (useradd --system edgepack) and rerun")
    pw = pwd.getpwnam(USER)
    return pw.pw_uid, pw.pw_gid


def chown_tree(root: Path, uid: int, gid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        os.lchown(dirpath, uid, gid)
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


@dataclass(frozen=True)
class UnitsResult:
    written: tuple[Path, ...]
    changed: bool
    started: bool
    message: str


def install_units(units: dict[str, str], unit_dir: Path, *, manage: bool,
                  restart: bool, log: Callable[[str], None]) -> UnitsResult:
    """Write the unit files; with ``manage`` (systemd is running) reload, enable and (re)start
    the server. The agent unit is written but enabled only once updates are configured."""
    unit_dir.mkdir(parents=True, exist_ok=True)
    written, changed = [], False
    for name, text in sorted(units.items()):
        path = unit_dir / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            tmp = path.with_name(f".{name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
            changed = True
        written.append(path)
    if not manage:
        return UnitsResult(tuple(written), changed, False, "")
    server = next(n for n in units if "server" in n)
    for cmd in (["systemctl", "daemon-reload"], ["systemctl", "enable", server],
                ["systemctl", "restart" if (restart or changed) else "start", server]):
        log(" ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeHealthError(
                f"{' '.join(cmd)} failed: {proc.stderr.strip()}",
                hint=f"see journalctl -u {server}",
            )
    return UnitsResult(tuple(written), changed, True, "")
