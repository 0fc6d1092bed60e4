"""The programs tests start (nginx, systemd-analyze, ...): find them or skip with the reason.

One table, ``scripts/programs.txt``, names each program with its Debian package;
``scripts/ensure-programs`` (run by scripts/test and .ci/run) installs the missing ones where
it can (root + apt-get). A test that starts a program calls :func:`require_program` first, so
on a machine where the install was impossible it skips with the reason instead of erroring.

Programs are looked up on PATH only (scripts/test adds the sbin folders), so hiding a
folder from PATH is enough to see the suite as a machine without that program would.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

TABLE = Path(__file__).resolve().parents[2] / "scripts" / "programs.txt"


def _table() -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(None, 2)
        out[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
    return out


def find_program(name: str) -> str | None:
    """The path of ``name`` on PATH, or None. ``name`` must be listed in scripts/programs.txt."""
    if name not in _table():
        raise KeyError(f"{name!r} is not listed in {TABLE}; add a line for it there")
    return shutil.which(name)


def require_program(name: str) -> str:
    """The path of ``name``; skips the calling test (or fixture) with the reason when missing."""
    path = find_program(name)
    if path is None:
        package, why = _table()[name]
        pytest.skip(
            f"{name} is not on PATH (it {why}); install it with `apt-get install {package}` "
            "or run scripts/test as root, which does"
        )
    return path
