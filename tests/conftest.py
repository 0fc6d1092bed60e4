"""Shared fixtures. Fixture modules live in tests/support/ and are imported here."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_user_dirs(tmp_path_factory, monkeypatch):
    """Point every user-level directory at a temporary one, so tests never touch ~/."""
    home = tmp_path_factory.mktemp("edgepack-home")
    monkeypatch.setenv("EDGEPACK_HOME", str(home))
    monkeypatch.delenv("EDGEPACK_DEBUG", raising=False)
    monkeypatch.delenv("EDGEPACK_API_KEY", raising=False)
    yield
