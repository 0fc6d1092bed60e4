"""Resolve a ``--device`` value: a shipped id, a profile file, or ``local`` (this machine)."""

from __future__ import annotations

from edgepack.device.catalog import load_profile_ref
from edgepack.device.detect import local_profile
from edgepack.device.profile import DeviceProfile


def load_profile(ref: str) -> DeviceProfile:
    """Resolve ``ref``: a shipped id, a path to a .toml file, or ``local`` (this machine,
    its memory bandwidth measured once and then cached).

    Raises ProfileError for an unknown id (listing close matches), an unreadable file or an
    invalid profile.
    """
    if ref == "local":
        return local_profile()
    return load_profile_ref(ref)
