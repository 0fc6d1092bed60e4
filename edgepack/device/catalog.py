"""Loading device profiles: the shipped TOML files, a profile file by path, by id.

Device-side: stdlib only (plus ``tomli`` on 3.10).
"""

from __future__ import annotations

import difflib
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from edgepack.device.profile import DeviceProfile
from edgepack.device.validation import Validator, parse_profile_dict
from edgepack.errors import ProfileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


def parse_profile_toml(text: str, *, origin: str, expected_id: str | None = None) -> DeviceProfile:
    """Parse and validate TOML text; ``expected_id`` (the file stem) must equal ``id``.

    Raises ProfileError for TOML syntax errors and schema violations.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(
            f"invalid device profile {origin}: not valid TOML: {e}",
            hint="check quotes and brackets; the schema is in the edgepack.device.profile "
            "docstring",
        ) from e
    profile = parse_profile_dict(data, origin=origin)
    if expected_id is not None and profile.id != expected_id:
        raise Validator(origin).fail(
            "id", profile.id, f"'{expected_id}' (a profile's id equals its file name stem)"
        )
    return profile


def _shipped_files() -> dict[str, Any]:
    root = resources.files("edgepack.device_profiles")
    return {
        entry.name[: -len(".toml")]: entry
        for entry in root.iterdir()
        if entry.name.endswith(".toml") and entry.is_file()
    }


def shipped_ids() -> list[str]:
    """Ids of the profiles shipped with edgepack, sorted."""
    return sorted(_shipped_files())


def list_profiles() -> list[DeviceProfile]:
    """Every shipped profile, validated, sorted by id. Raises ProfileError if one is invalid."""
    files = _shipped_files()
    return [
        parse_profile_toml(
            files[pid].read_text(encoding="utf-8"),
            origin=f"device_profiles/{pid}.toml",
            expected_id=pid,
        )
        for pid in sorted(files)
    ]


def load_profile_file(path: str | Path) -> DeviceProfile:
    """Load a profile from a .toml file; its id must equal the file name stem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ProfileError(
            f"cannot read device profile {p}: {e.strerror or e}",
            hint="pass a shipped id (edgepack profiles list) or a readable .toml file",
        ) from e
    return parse_profile_toml(text, origin=str(p), expected_id=p.stem)


def load_profile_ref(ref: str) -> DeviceProfile:
    """Resolve ``ref``: a shipped id or a path to a .toml file (``local`` is
    :func:`edgepack.device.resolve.load_profile`'s).

    Raises ProfileError for an unknown id (listing close matches), an unreadable file or an
    invalid profile.
    """
    looks_like_path = ref.endswith(".toml") or "/" in ref or "\\" in ref
    if looks_like_path:
        return load_profile_file(ref)
    files = _shipped_files()
    if ref in files:
        return parse_profile_toml(
            files[ref].read_text(encoding="utf-8"),
            origin=f"device_profiles/{ref}.toml",
            expected_id=ref,
        )
    close = difflib.get_close_matches(ref, list(files), n=3, cutoff=0.4)
    # Substring matches catch "pi-5" or "orin" that difflib scores low.
    close += [i for i in sorted(files) if ref and ref in i and i not in close][: 3 - len(close)]
    suggestion = (
        f"did you mean {', '.join(close)}? "
        if close
        else f"known ids: {', '.join(sorted(files))}; "
    )
    raise ProfileError(
        f"unknown device profile '{ref}'",
        hint=f"{suggestion}run 'edgepack profiles list' for the shipped ids, pass a path to a "
        "profile .toml, or 'local' for this machine",
    )
