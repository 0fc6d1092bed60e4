"""An emulated Arm device for the tests: a Debian 12 arm64 root run under qemu user mode.

The root is made with ``mmdebstrap --variant=extract --architectures=arm64`` from the mirror
this machine's apt uses, holding only what a fresh Raspberry Pi OS Lite has that the install
needs (python3, python3-venv, dash, coreutils, the C/C++ runtime, useradd), and is cached in
``~/.cache/edgepack-test-arm/<key>/`` keyed by that package list, suite and mirror. Each test
runs on its own copy, so installs never leak between tests.

Programs run with ``proot -0 -q 'qemu-aarch64-static -cpu cortex-a76' -r ROOT``: proot
translates paths and fakes root, and runs every Arm executable through qemu, so neither
binfmt_misc nor a mount is needed. ``offline=True`` adds ``unshare -n``: no network at all.
Every program sees a Pi 5's /proc/cpuinfo and device-tree model (``device_binds``), not the
host's. Without ``offline`` the device shares the host's loopback (an update repository or a
server on 127.0.0.1 is reachable both ways).
Debian packages: mmdebstrap, proot, qemu-user-static (``.ci/run`` installs them).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from support.programs import require_program

SUITE = "bookworm"
# base-files: /etc/os-release (Debian 12), which every Raspberry Pi OS has and detect reads.
PACKAGES = ("python3", "python3-venv", "dash", "coreutils", "libc-bin", "libstdc++6",
            "libgomp1", "passwd", "ca-certificates", "base-files")
CPU = "cortex-a76"
# What a Pi 5's kernel shows in /proc, which qemu user mode cannot: see device_binds().
PI5_CPUINFO = Path(__file__).parents[1] / "data" / "cpuinfo" / "raspberry-pi-5.txt"
PI5_MODEL = b"Raspberry Pi 5 Model B Rev 1.0\x00"
TOOLS = ("mmdebstrap", "proot", "qemu-aarch64-static")
_DEFAULT_MIRROR = "http://deb.debian.org/debian"


def require_emulator() -> None:
    """Skip, naming what is missing, where the emulator packages are not installed
    (scripts/programs.txt lists them; .ci/run and scripts/test install them)."""
    for tool in TOOLS:
        require_program(tool)
    if shutil.which("unshare") is None:  # util-linux: essential on Debian
        pytest.skip("unshare (util-linux) is not on PATH: the offline install cannot be cut "
                    "from the network")


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources)."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in path.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[1]:
                return parts[1] if not parts[1].startswith("[") else parts[2]
    return _DEFAULT_MIRROR


def cache_dir() -> Path:
    base = os.environ.get("EDGEPACK_TEST_ARM_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "edgepack-test-arm"


def cached_root() -> Path:
    """The cached, pristine root (made on first use; a few seconds from a near mirror)."""
    mirror = apt_mirror()
    key = hashlib.sha256(f"{SUITE}\n{mirror}\n{' '.join(PACKAGES)}".encode()).hexdigest()[:16]
    root = cache_dir() / key / "root"
    if (root / "usr" / "bin" / "python3").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tar = tmp / "root.tar"
    proc = subprocess.run(["mmdebstrap", "--variant=extract", "--architectures=arm64",
                           "--include=" + ",".join(PACKAGES), SUITE, str(tar), mirror],
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"mmdebstrap failed:\n{proc.stderr[-3000:]}")
    (tmp / "root").mkdir()
    subprocess.run(["tar", "-C", str(tmp / "root"), "-xf", str(tar)], check=True)
    tar.unlink()
    # extract does not configure packages: give python3 the /usr/bin/python3 it links to
    # and an /etc/passwd, /etc/group that useradd can extend, as an installed system has.
    etc = tmp / "root" / "etc"
    for name, text in (("passwd", "root:x:0:0:root:/root:/bin/sh\n"),
                       ("group", "root:x:0:\n"), ("shadow", "root:*:19000:0:99999:7:::\n"),
                       ("gshadow", "root:*::\n")):
        if not (etc / name).exists():
            (etc / name).write_text(text)
    (tmp / "root" / "root").mkdir(exist_ok=True)
    os.replace(tmp / "root", root)
    shutil.rmtree(tmp, ignore_errors=True)
    return root


def fresh_root(dest: Path) -> Path:
    """A private copy of the cached root for one test."""
    subprocess.run(["cp", "-a", str(cached_root()), str(dest)], check=True)
    return dest


def device_binds() -> list[str]:
    """A Raspberry Pi 5's /proc/cpuinfo and /proc/device-tree/model over the host's.

    Under qemu user mode /proc is the host's kernel's, so programs would read this x86
    machine's cpuinfo: onnxruntime's CPU probe (pytorch/cpuinfo) dies of SIGSEGV at import on
    it, and ``profiles detect`` would see an Intel board. The Pi 5's own cpuinfo (the one
    tests/test_detect.py parses) and board model make the emulated device read as one.
    """
    model = cache_dir() / "pi5-device-tree-model"
    if not model.is_file() or model.read_bytes() != PI5_MODEL:
        model.parent.mkdir(parents=True, exist_ok=True)
        tmp = model.with_name(f".{model.name}.{os.getpid()}")
        tmp.write_bytes(PI5_MODEL)
        os.replace(tmp, model)
    return [f"{PI5_CPUINFO}:/proc/cpuinfo", f"{model}:/proc/device-tree/model"]


def arm_command(root: Path, argv: Sequence[str], *, offline: bool = False,
                cwd: str = "/", binds: Sequence[str] = ()) -> list[str]:
    cmd = ["proot", "-0", "-q", f"qemu-aarch64-static -cpu {CPU}", "-r", str(root),
           "-w", cwd, "-b", "/dev", "-b", "/proc", "-b", "/sys"]
    for b in [*device_binds(), *binds]:
        cmd += ["-b", b]
    cmd += list(argv)
    return ["unshare", "-n", *cmd] if offline else cmd


def arm_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": "/root", "LANG": "C.UTF-8", "PROOT_NO_SECCOMP": "1",
           "TMPDIR": "/tmp"}
    env.update(extra or {})
    return env


def run_arm(root: Path, argv: Sequence[str], *, offline: bool = False, timeout: float = 900,
            env: Mapping[str, str] | None = None,
            binds: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside the emulated device; returns the finished process."""
    return subprocess.run(arm_command(root, argv, offline=offline, binds=binds),
                          capture_output=True, text=True, timeout=timeout, env=arm_env(env))


def same_path_bind(root: Path, guest_dir: str) -> tuple[str, str]:
    """``(bind, path)``: ``guest_dir`` of the device made visible inside it at the very path
    it has on the host.

    proot 5.3 (Debian 12) does not translate the paths of the newer ``faccessat2`` and
    ``statx`` system calls, which glibc 2.36 and coreutils use (access(2), ``ls``), so under
    qemu those look the guest path up on the host. A folder whose guest and host paths are
    the same string answers them correctly; every other call still goes through proot.
    """
    host = str(root / guest_dir.lstrip("/"))
    return f"{host}:{host}", host


def popen_arm(root: Path, argv: Sequence[str], out: IO[bytes], *,
              binds: Sequence[str] = (), env: Mapping[str, str] | None = None,
              ) -> subprocess.Popen[bytes]:
    """Start ``argv`` inside the emulated device (sharing the host's loopback)."""
    return subprocess.Popen(arm_command(root, argv, binds=binds), stdout=out,
                            stderr=subprocess.STDOUT, env=arm_env(env), start_new_session=True)


def python_version_in(root: Path) -> str:
    proc = run_arm(root, ["/usr/bin/python3", "-c",
                          "import sys; print('%d.%d' % sys.version_info[:2])"], timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr)
    return proc.stdout.strip()




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive_in(pgid: int, wait: float = 30) -> bool:
    """Whether a process of group ``pgid`` still exists after up to ``wait`` seconds (killed
    emulator processes are reaped by init, not at once)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.5)


@dataclass
class ArmServer:
    url: str
    ready_s: float  # from the start of the emulated process to /readyz 200
    log: Path


@contextlib.contextmanager
def arm_server(root: Path, bundle: str, log: Path, *, binds: Sequence[str] = (),
               timeout: float = 1800,
               edgepack: str = "/opt/edgepack/bin/edgepack") -> Iterator[ArmServer]:
    """``edgepack serve BUNDLE`` inside the emulated device on a free loopback port, until
    ``/readyz`` answers 200; on exit its whole session is stopped (proot may exit on SIGTERM
    while its emulated child serves on) and the test fails if any of it outlives that."""
    import httpx

    port = free_port()
    out = open(log, "wb")  # noqa: SIM115 - closed below, after the process
    t0 = time.monotonic()
    proc = popen_arm(root, [edgepack, "serve", bundle, "--port", str(port)], out, binds=binds)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = t0 + timeout
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(2)
        yield ArmServer(url, time.monotonic() - t0, log)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        out.close()
        assert not alive_in(proc.pid), "the emulated server outlived the test"
