"""edgepack: build, serve and update models on edge devices.

This module stays import-light: device-side code imports ``edgepack`` and must not pull in
torch, transformers, optimum or huggingface_hub. The library API (``edgepack.plan``,
``edgepack.build``, ``edgepack.serve``; see :mod:`edgepack.api`) loads on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "build", "plan", "serve"]


def __getattr__(name: str) -> Any:
    # PEP 562: the API loads on first use. `plan` and `build` are also subpackages, made
    # callable (edgepack/_callable.py), so `edgepack.build(...)` works before and after
    # `import edgepack.build.pipeline`; `serve` is a plain function of edgepack.api.
    if name in ("plan", "build"):
        import importlib

        return importlib.import_module(f"edgepack.{name}")
    if name == "serve":
        from edgepack.api import serve

        return serve
    raise AttributeError(f"module 'edgepack' has no attribute {name!r}")
