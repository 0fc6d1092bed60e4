"""llama-cpp-python compiled on this (x86-64) machine for an Arm device's CPU.

PyPI carries llama-cpp-python as an sdist only, so a device would otherwise compile it itself
(tens of minutes on a Pi, and it needs a compiler and the network). Here the sdist is built
with Debian's cross compilers (``gcc-aarch64-linux-gnu``, ``g++-aarch64-linux-gnu``) and CMake
told it is cross compiling (CMAKE_SYSTEM_NAME/PROCESSOR, which also turns GGML_NATIVE off:
ggml/CMakeLists.txt sets ``GGML_NATIVE_DEFAULT OFF`` when CMAKE_CROSSCOMPILING), with
``-mcpu=<profile cpu.target>`` so the kernels use that core's extensions (dotprod on a
Cortex-A76, none of them on a Cortex-A72). llama-cpp-python loads its shared libraries with
ctypes and links no libpython, so one wheel serves every CPython 3 (``py3-none``); only its
platform tag is rewritten to ``linux_aarch64`` with ``wheel tags``.

The wheel is cached under ``$EDGEPACK_CACHE/runtime/llama-cpp-python/`` keyed by
(version, target CPU, recipe): a second build for the same device costs nothing.
No CUDA toolchain for aarch64 exists here, so a Jetson gets a CPU build, and the pack says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgepack.errors import BuildError

# Bump when the flags below change, so cached wheels built the old way are not reused.
RECIPE = 1
CROSS_PREFIX = "aarch64-linux-gnu-"
_EM_AARCH64 = 183  # ELF e_machine of AArch64 (ELF for the Arm 64-bit Architecture, 5.4.1)


@dataclass(frozen=True)
class CrossWheel:
    path: Path
    version: str
    target_cpu: str
    cflags: str
    seconds: float  # compile time; 0 when it came from the cache
    cached: bool


def llama_cpp_python_version() -> str:
    """The llama-cpp-python this build machine runs: the device gets the same release."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError as e:
        raise BuildError("llama-cpp-python is not installed on this build machine",
                         hint="pip install 'edgepack[llama]'") from e


def check_toolchain() -> None:
    missing = [t for t in (f"{CROSS_PREFIX}gcc", f"{CROSS_PREFIX}g++", "cmake")
               if shutil.which(t) is None]
    if missing:
        raise BuildError(
            f"the aarch64 cross toolchain is missing: {', '.join(missing)}",
            hint="sudo apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu cmake "
            "(Debian/Ubuntu), then build again",
        )


def _cmake_args(target_cpu: str) -> str:
    sysroot = f"/usr/{CROSS_PREFIX.rstrip('-')}"
    return " ".join([
        "-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
        f"-DCMAKE_C_COMPILER={CROSS_PREFIX}gcc", f"-DCMAKE_CXX_COMPILER={CROSS_PREFIX}g++",
        f"-DCMAKE_C_FLAGS=-mcpu={target_cpu}", f"-DCMAKE_CXX_FLAGS=-mcpu={target_cpu}",
        "-DGGML_NATIVE=OFF",
        # What the server never loads: multimodal (mtmd), llama.cpp's tools, tests, examples.
        "-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
        f"-DCMAKE_FIND_ROOT_PATH={sysroot}", "-DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER",
        "-DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY", "-DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY",
    ])


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None,
         cwd: Path | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise BuildError(f"{what} failed (exit {proc.returncode}):\n{tail}",
                         hint="rerun with EDGEPACK_DEBUG=1; the cross toolchain and network "
                         "access to PyPI (for the sdist and scikit-build-core) are needed")
    return proc.stdout


def check_aarch64_wheel(wheel: Path) -> None:
    """Every shared library in ``wheel`` is an AArch64 ELF (a host build would load nowhere)."""
    with zipfile.ZipFile(wheel) as z:
        libs = [n for n in z.namelist() if ".so" in Path(n).name]
        if not libs:
            raise BuildError(f"{wheel.name} holds no shared library")
        for name in libs:
            head = z.read(name)[:20]
            if head[:4] != b"\x7fELF" or int.from_bytes(head[18:20], "little") != _EM_AARCH64:
                raise BuildError(f"{wheel.name}: {name} is not an AArch64 library")


def cross_compile_llama(target_cpu: str, cache: Path, *, version: str | None = None,
                        log: Callable[[str], None] = lambda _m: None) -> CrossWheel:
    """The llama-cpp-python wheel for ``target_cpu`` (a gcc -mcpu name), from the cache or
    compiled now. Raises BuildError (no toolchain, compile failure, wrong architecture)."""
    version = version or llama_cpp_python_version()
    slot = cache / "runtime" / "llama-cpp-python" / f"{version}-{target_cpu}-r{RECIPE}"
    cflags = f"-mcpu={target_cpu}"
    found = sorted(slot.glob("*.whl")) if slot.is_dir() else []
    if found:
        log(f"llama-cpp-python {version} for {target_cpu}: cached {found[0].name}")
        return CrossWheel(found[0], version, target_cpu, cflags, 0.0, True)
    check_toolchain()
    log(f"cross-compiling llama-cpp-python {version} for {target_cpu} (minutes; cached after)")
    slot.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{slot.name}.partial-", dir=slot.parent))
    t0 = time.perf_counter()
    try:
        pip = [sys.executable, "-m", "pip"]
        _run([*pip, "download", "--no-deps", "--no-binary", ":all:", "-d", str(work / "sdist"),
              f"llama-cpp-python=={version}"], "downloading the llama-cpp-python sdist")
        sdist = next((work / "sdist").iterdir())
        env = dict(os.environ, CMAKE_ARGS=_cmake_args(target_cpu),
                   CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2), FORCE_CMAKE="1")
        _run([*pip, "wheel", "--no-deps", "-w", str(work / "built"), str(sdist)],
             f"compiling llama-cpp-python for {target_cpu}", env=env)
        built = next((work / "built").glob("*.whl"))
        out = _run([sys.executable, "-m", "wheel", "tags", "--platform-tag", "linux_aarch64",
                    "--remove", built.name], "retagging the wheel", cwd=work / "built")
        wheel = work / "built" / out.strip().splitlines()[-1]
        check_aarch64_wheel(wheel)
        (work / "wheel").mkdir()
        os.replace(wheel, work / "wheel" / wheel.name)
        shutil.rmtree(work / "sdist")
        shutil.rmtree(work / "built")
        os.replace(work / "wheel", slot)  # whole, or not at all
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    path = next(slot.glob("*.whl"))
    log(f"cross-compile {target_cpu}: {seconds:.1f} s, {path.stat().st_size / 2**20:.1f} MiB")
    return CrossWheel(path, version, target_cpu, cflags, seconds, False)
