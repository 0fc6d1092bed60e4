"""The one mechanism for programs the tests start: scripts/programs.txt, scripts/ensure-programs
and support.programs.require_program agree, and a missing program means a skip, not an error."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from support.programs import TABLE, _table, find_program, require_program

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], path: str, **env: str) -> subprocess.CompletedProcess:
    e = {**os.environ, "PATH": path, **env}
    return subprocess.run(["bash", str(ROOT / "scripts" / "ensure-programs"), *args],
                          env=e, capture_output=True, text=True, timeout=60)


def _path_without(program: str) -> str:
    # Keep bash and the coreutils the script uses; drop only the folders holding `program`.
    keep = [d for d in os.environ["PATH"].split(os.pathsep)
            if d and not (Path(d) / program).exists()]
    return os.pathsep.join(keep)


def test_every_program_a_test_requires_is_in_the_table():
    names = set(_table())
    used = set()
    for f in (ROOT / "tests").rglob("*.py"):
        if f.name == Path(__file__).name:  # names unknown programs on purpose
            continue
        used |= set(re.findall(r"(?:require|find)_program\(\"([^\"]+)\"\)", f.read_text()))
    assert used, "no test calls require_program: the scan is broken"
    assert used <= names, f"add {sorted(used - names)} to {TABLE}"


def test_an_unknown_program_is_a_clear_error():
    with pytest.raises(KeyError, match="not listed in .*programs.txt"):
        find_program("no-such-program")


def test_a_missing_program_skips_with_the_package_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.skip.Exception, match=r"apt-get install nginx"):
        require_program("nginx")


def test_ensure_programs_reports_a_missing_program_and_passes(tmp_path):
    p = _run(["nginx"], _path_without("nginx"), EDGEPACK_INSTALL_PROGRAMS="0")
    assert p.returncode == 0, p.stderr
    assert "missing nginx (EDGEPACK_INSTALL_PROGRAMS=0)" in p.stderr
    strict = _run(["--require", "nginx"], _path_without("nginx"), EDGEPACK_INSTALL_PROGRAMS="0")
    assert strict.returncode == 1


def test_ensure_programs_is_quiet_when_everything_is_there(tmp_path):
    # A stand-in executable named like a listed program: the script must find it on PATH
    # and do nothing (no apt-get, no message).
    fake = tmp_path / "bin"
    fake.mkdir()
    exe = fake / "systemd-analyze"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    p = _run(["systemd-analyze"], f"{fake}{os.pathsep}{os.environ['PATH']}",
             EDGEPACK_INSTALL_PROGRAMS="0")
    assert p.returncode == 0 and p.stderr == ""


def test_ensure_programs_refuses_a_program_missing_from_the_table():
    p = _run(["no-such-program"], os.environ["PATH"])
    assert p.returncode == 2
    assert "no-such-program is not in scripts/programs.txt" in p.stderr
