"""Device-side code must not import the build side (torch, transformers, optimum, hub)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import edgepack.runtimes

import edgepack

FORBIDDEN = ("torch", "transformers", "optimum", "huggingface_hub")

# Modules that run on a device. runtimes/ and agent/ are discovered, so new modules are covered.
DEVICE_MODULES = [
    "edgepack",
    "edgepack.errors",
    "edgepack.manifest",
    "edgepack.profiles",
    "edgepack.detect",
    "edgepack.cli",
]


def _package_modules(pkg) -> list[str]:
    return [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]


def _device_modules() -> list[str]:
    mods = list(DEVICE_MODULES) + ["edgepack.runtimes", *_package_modules(edgepack.runtimes)]
    try:
        import edgepack.agent as agent
    except ImportError:
        pass
    else:
        mods += ["edgepack.agent", *_package_modules(agent)]
    return mods


def test_device_modules_import_nothing_from_the_build_side():
    mods = _device_modules()
    assert "edgepack.runtimes" in mods and len(mods) > len(DEVICE_MODULES)
    code = (
        "import importlib, json, sys\n"
        f"for m in {mods!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    leaked = json.loads(out.stdout.strip().splitlines()[-1])
    assert leaked == [], f"device-side modules pulled in build-side packages: {leaked}"


def test_the_check_itself_catches_a_build_side_import():
    # The same probe on a build-side module must see the leak, or the test above proves nothing.
    code = (
        "import sys, json; import huggingface_hub\n"
        f"print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert "huggingface_hub" in json.loads(out.stdout.strip().splitlines()[-1])
