"""The package's two sides stay apart.

- Device side (``runtimes/`` = ``edgepack.runtimes``, ``edgepack/ota/agent/``, ``edgepack/device/``
  and the small core) never imports ``edgepack.build``, ``edgepack.cli``, torch, transformers,
  optimum or huggingface_hub — neither at import time (a subprocess probe of ``sys.modules``)
  nor inside a function body (a scan of every import statement in the source).
- The planner (``edgepack/plan/``) imports nothing that does I/O beyond reading profiles: no
  network client, no subprocess, no other edgepack stage.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import edgepack.runtimes

import edgepack
import edgepack.device
import edgepack.install
import edgepack.ota.agent
import edgepack.plan

BUILD_SIDE = ("torch", "transformers", "optimum", "huggingface_hub", "edgepack.build",
              "edgepack.cli")
CORE = ["edgepack", "edgepack.errors", "edgepack.manifest", "edgepack.paths",
        "edgepack.signature", "edgepack.keys", "edgepack.archive"]
DEVICE_PACKAGES = (edgepack.runtimes, edgepack.ota.agent, edgepack.device, edgepack.install)
# What a pure planner must not load: network clients, process spawning, other stages.
PLAN_FORBIDDEN = ("huggingface_hub", "requests", "httpx", "urllib3", "urllib.request",
                  "http.client", "subprocess", "torch", "transformers", "edgepack.build",
                  "edgepack.ota", "edgepack.cli", "edgepack.runtimes")


def _package_modules(pkg) -> list[str]:
    return [pkg.__name__,
            *(m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."))]


def _device_modules() -> list[str]:
    mods = list(CORE)
    for pkg in DEVICE_PACKAGES:
        mods += _package_modules(pkg)
    return mods


def _loaded_after_import(mods: list[str], forbidden: tuple[str, ...],
                         extra_path: str | None = None) -> list[str]:
    """Import ``mods`` in a fresh interpreter; return the loaded modules matching ``forbidden``."""
    code = (
        "import importlib, json, sys\n"
        f"sys.path.insert(0, {extra_path!r})\n" if extra_path else "import importlib, json, sys\n"
    ) + (
        f"for m in {mods!r}: importlib.import_module(m)\n"
        f"bad = {forbidden!r}\n"
        "print(json.dumps(sorted(k for k in sys.modules\n"
        "      if any(k == b or k.startswith(b + '.') for b in bad))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _imports_in_source(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in ``path`` (function bodies too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _source_violations(packages, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad: dict[str, list[str]] = {}
    for pkg in packages:
        for path in sorted(Path(pkg.__path__[0]).rglob("*.py")):
            hits = sorted(n for n in _imports_in_source(path)
                          if any(n == b or n.startswith(b + ".") for b in forbidden))
            if hits:
                bad[str(path)] = hits
    return bad


def test_device_side_loads_nothing_from_the_build_side():
    mods = _device_modules()
    assert "edgepack.runtimes.app" in mods and "edgepack.ota.agent.updater" in mods
    assert "edgepack.device.detect" in mods
    leaked = _loaded_after_import(mods, BUILD_SIDE)
    assert leaked == [], f"device-side modules pulled in build-side modules: {leaked}"


def test_device_side_source_names_no_build_side_import_even_in_functions():
    assert _source_violations(DEVICE_PACKAGES, BUILD_SIDE) == {}


def test_planner_loads_nothing_with_io():
    mods = _package_modules(edgepack.plan)
    assert "edgepack.plan.planner" in mods
    assert _loaded_after_import(mods, PLAN_FORBIDDEN) == []
    assert _source_violations([edgepack.plan], PLAN_FORBIDDEN) == {}


def test_the_probes_catch_a_leak(tmp_path):
    # The same probes on a module that does leak must see it, or the tests above prove nothing.
    pkg = tmp_path / "leaky_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("import edgepack.build.model_files\n"
                                "def later():\n    import huggingface_hub\n")
    assert "edgepack.build.model_files" in _loaded_after_import(
        ["leaky_pkg.mod"], BUILD_SIDE, extra_path=str(tmp_path))
    sys.path.insert(0, str(tmp_path))
    try:
        import leaky_pkg

        found = _source_violations([leaky_pkg], BUILD_SIDE)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("leaky_pkg", None)
    assert found == {str(pkg / "mod.py"): ["edgepack.build.model_files", "huggingface_hub"]}
