"""The device's Python environment: one venv (default ``/opt/edgepack``) filled from the
bundle's runtime pack with no index.

A venv sidesteps PEP 668 (Raspberry Pi OS Bookworm marks its system Python
"externally managed", https://peps.python.org/pep-0668/): pip never touches the system's
packages. A venv cannot be moved once made (its scripts name its own path), so it is built
in place, and ``.edgepack-venv.json`` is written last: without it the venv is unfinished and
the next install builds it again. With it, and the same requirements digest, pip is not run.

Device side: standard library and edgepack.errors only.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepack.errors import ConfigError, RuntimeHealthError

MARKER = ".edgepack-venv.json"
REQUIREMENTS = "runtime/requirements.txt"
WHEELS = "runtime/wheels"


def requirements_digest(bundle: Path) -> str:
    return hashlib.sha256((bundle / REQUIREMENTS).read_bytes()).hexdigest()


def check_platform(runtime: dict[str, Any], *, machine: str | None = None,
                   python: str | None = None) -> None:
    """Refuse a pack built for another CPU architecture or Python (exit 3), before pip."""
    machine = machine or platform.machine()
    python = python or f"{sys.version_info.major}.{sys.version_info.minor}"
    want_arch, want_py = runtime.get("arch"), runtime.get("python")
    if want_arch != machine or want_py != python:
        raise ConfigError(
            f"this bundle's runtime pack is for {want_arch} CPython {want_py} "
            f"({runtime.get('os')}), this machine is {machine} CPython {python}",
            hint="build the bundle for this device's profile (edgepack profiles detect shows "
            "it), or install edgepack by hand and pass --no-venv",
        )


def _marker(prefix: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((prefix / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def venv_is_current(prefix: Path, bundle: Path) -> bool:
    m = _marker(prefix)
    return m is not None and m.get("requirements_sha256") == requirements_digest(bundle) and (
        prefix / "bin" / "edgepack").is_file()


def _run(cmd: list[str], what: str, log: Callable[[str], None]) -> None:
    log(" ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeHealthError(
            f"{what} failed (exit {proc.returncode}):\n{tail}",
            hint="python3-venv must be installed (sudo apt install python3-venv); the pack "
            "must match this device (edgepack inspect BUNDLE shows its platform)",
        )


def ensure_venv(prefix: Path, bundle: Path, *, python: str = "python3",
                log: Callable[[str], None] = lambda _m: None) -> bool:
    """Make ``prefix`` a venv holding exactly the pack's pinned, hashed requirements.

    Returns False when it already did (nothing run), True when pip ran. Raises
    RuntimeHealthError when venv or pip fail; the marker is then absent, so the venv never
    looks finished.
    """
    if venv_is_current(prefix, bundle):
        log(f"venv {prefix} already holds this runtime pack")
        return False
    (prefix / MARKER).unlink(missing_ok=True)
    py = prefix / "bin" / "python"
    if prefix.exists() and not (prefix / "pyvenv.cfg").is_file():
        raise ConfigError(
            f"{prefix} exists and is not a venv",
            hint="choose another --prefix or remove that folder",
        )
    if not py.exists():
        exe = shutil.which(python) or python
        _run([exe, "-m", "venv", str(prefix)], f"creating the venv {prefix}", log)
    _run([str(py), "-m", "pip", "install", "--no-index", "--no-cache-dir",
          "--disable-pip-version-check", "--find-links", str(bundle / WHEELS),
          "--require-hashes", "--upgrade", "-r", str(bundle / REQUIREMENTS)],
         "installing the runtime pack", log)
    tmp = prefix / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"requirements_sha256": requirements_digest(bundle)},
                              indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, prefix / MARKER)
    return True
