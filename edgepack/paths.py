"""Where edgepack keeps its files on the build machine. Read at call time, never at import."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def edgepack_home(environ: Mapping[str, str] | None = None) -> Path:
    """``$EDGEPACK_HOME`` or ``~/.cache/edgepack``: edgepack's own state and caches."""
    env = os.environ if environ is None else environ
    return Path(env.get("EDGEPACK_HOME") or Path.home() / ".cache" / "edgepack")


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$EDGEPACK_CACHE`` or ``$EDGEPACK_HOME/cache``: the converter, intermediates and
    quantized files, all keyed by what they were made from, so sharing them is safe."""
    env = os.environ if environ is None else environ
    return Path(env.get("EDGEPACK_CACHE") or edgepack_home(env) / "cache")
