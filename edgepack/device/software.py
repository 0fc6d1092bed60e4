"""What software a device runs, for the ``[software]`` table of a detected profile: the OS
(os-release(5) ``ID-VERSION_ID``), the python (MAJOR.MINOR) and the C library (glibc
MAJOR.MINOR), the facts the runtime pack chooses its wheels by.

Device-side: stdlib only.
"""

from __future__ import annotations

import os
import platform
import re

from edgepack.device.profile import SoftwareSpec

# What the profile validator accepts (edgepack.device.validation): a value os-release gives
# that does not fit leaves the table out rather than failing detection.
_OS_ID = re.compile(r"^[a-z0-9][a-z0-9._-]*-[0-9][0-9.]*$")


def parse_os_release(text: str) -> dict[str, str]:
    """os-release(5): ``KEY=value`` lines, values optionally quoted shell-style."""
    import shlex

    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if not sep or key.startswith("#"):
            continue
        try:
            words = shlex.split(value)
        except ValueError:
            continue
        out[key] = words[0] if words else ""
    return out


def this_libc() -> str | None:
    """``glibc 2.36``-style text of this process's C library, or None when unknown."""
    try:
        found = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):
        found = None
    if found:
        return found
    name, version = platform.libc_ver()
    return f"{name} {version}" if name and version else None


def software_facts(os_release: str | None, python: str | None, libc: str | None,
                   stamp: str) -> tuple[SoftwareSpec | None, dict[str, str]]:
    """The ``[software]`` table and its sources from the text of /etc/os-release, the
    python's MAJOR.MINOR and the confstr libc text; (None, {}) when one of them is unknown
    (the table is all-or-none) or the libc is not glibc."""
    release = parse_os_release(os_release or "")
    os_id = release.get("ID", "").lower()
    version = release.get("VERSION_ID", "")
    m = re.fullmatch(r"glibc (\d+)\.(\d+)(?:\.\d+)*", (libc or "").strip())
    py = python or ""
    os_name = f"{os_id}-{version}"
    if not (_OS_ID.match(os_name) and m and re.fullmatch(r"3\.\d{1,2}", py)):
        return None, {}
    spec = SoftwareSpec(os=os_name, python=py, libc=f"glibc-{m[1]}.{m[2]}")
    sources = {
        "software.os": f"/etc/os-release ID={os_id} VERSION_ID={version}; {stamp}",
        "software.python": f"sys.version_info of the python running detect; {stamp}",
        "software.libc": f"C library {libc!r} (os.confstr CS_GNU_LIBC_VERSION, else "
                         f"platform.libc_ver()); {stamp}",
    }
    return spec, sources

