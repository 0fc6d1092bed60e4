"""Build a device profile of the machine edgepack runs on (``edgepack profiles detect``).

The shell (:func:`gather_host_facts`) reads psutil, ``/proc/cpuinfo``, ``/proc/device-tree/model``,
``/etc/nv_tegra_release``, ``/proc/meminfo`` via psutil and ``/sys`` once; the core
(:func:`build_profile`) is a pure function of those facts, so it is tested with stored cpuinfo
texts of other machines. Device-side: stdlib + psutil only.

What a detected profile says, and on what basis (the same text goes into its ``sources``):

- memory.total_gib: psutil total; memory.os_reserve_gib: total - psutil *available* at detect
  time, so usable = what was free when detect ran.
- cpu.isa: kernel flags (x86 ``flags``, Arm ``Features``) mapped to edgepack names.
- On a Raspberry Pi or Jetson that matches a shipped profile, the figures detection cannot see
  (memory type, theoretical bandwidth, published measurement, accelerator) come from that profile.
- software: os from /etc/os-release (``ID-VERSION_ID``), python of the interpreter running
  detect (the device's python3, which the install's venv is made from), libc from
  ``os.confstr("CS_GNU_LIBC_VERSION")`` (``platform.libc_ver()`` where confstr has no answer);
  left out, all three, when one is unknown (the table is all-or-none) or the libc is not glibc.
- Otherwise the theoretical bandwidth is unknown: ``--measure`` runs :func:`measure_bandwidth`;
  without it the profile carries DEFAULT_BANDWIDTH_GBPS, the lowest figure among the shipped
  profiles, so an unknown machine is planned as a slow one rather than a fast one.
"""

from __future__ import annotations

import os
import platform
import re
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from edgepack.device.catalog import list_profiles
from edgepack.device.compute_probe import (
    DecodeRate,
    contended,
    measure_decode_gflops,
    with_measured_compute,
)
from edgepack.device.cpuinfo import (  # noqa: F401 - normalise_arch re-exported for callers
    CpuInfo,
    flop_per_cycle,
    normalise_arch,
    parse_cpuinfo,
)
from edgepack.device.measure_cache import machine_busy
from edgepack.device.profile import (
    AcceleratorSpec,
    CpuSpec,
    DeviceProfile,
    MemorySpec,
    StorageSpec,
)
from edgepack.device.software import software_facts, this_libc
from edgepack.device.validation import parse_profile_dict
from edgepack.errors import UsageError

GIB = 1024**3
# Raspberry Pi 4: LPDDR4-3200 on a 32-bit bus, the slowest memory among the shipped profiles.
DEFAULT_BANDWIDTH_GBPS = 12.8
# Used only when neither psutil nor /proc/cpuinfo reports a clock.
DEFAULT_GHZ = 2.0

_PI_RE = re.compile(r"Raspberry Pi (?:Compute Module )?([45])(?:\d\d)?\b")
_JETSON_FAMILIES = (
    ("AGX Orin", "jetson-agx-orin"),
    ("Orin NX", "jetson-orin-nx"),
    ("Orin Nano", "jetson-orin-nano"),
)
_LAPTOP_CHASSIS = {"8", "9", "10", "14", "31", "32"}
_SERVER_CHASSIS = {"17", "23", "28", "29"}
_MINI_PC_CHASSIS = {"35", "36"}


@dataclass(frozen=True)
class HostFacts:
    """Everything detection reads from the machine, as plain data."""

    hostname: str
    arch: str
    cpuinfo: str
    total_bytes: int
    available_bytes: int
    physical_cores: int
    logical_cpus: int
    max_mhz: float | None = None
    device_tree_model: str | None = None
    tegra_release: str | None = None
    storage_kind: str = "unknown"
    chassis_type: str | None = None
    has_battery: bool = False
    os_release: str | None = None  # the text of /etc/os-release
    python: str | None = None  # MAJOR.MINOR of the python running detect
    libc: str | None = None  # as confstr says it: "glibc 2.36"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


def root_storage_kind(root: Path = Path("/")) -> str:
    """Classify the block device holding ``/`` via /sys/dev/block; ``unknown`` when it is
    virtual (overlay, tmpfs, btrfs subvolume) or of another kind."""
    try:
        dev = os.stat("/").st_dev
    except OSError:
        return "unknown"
    node = root / "sys/dev/block" / f"{os.major(dev)}:{os.minor(dev)}"
    try:
        real = str(node.resolve(strict=True))
    except OSError:
        return "unknown"
    if "/nvme" in real:
        return "nvme"
    if "/usb" in real:
        return "usb"
    m = re.search(r"/block/(mmcblk\d+)", real)
    if m:
        kind = _read(root / "sys/block" / m.group(1) / "device/type")
        return "emmc" if kind == "MMC" else "microsd"
    if "/ata" in real:
        return "sata-ssd"
    return "unknown"


def gather_host_facts(root: Path = Path("/")) -> HostFacts:
    """Read this machine. ``root`` prefixes the /proc, /sys and /etc paths read directly."""
    import psutil

    vm = psutil.virtual_memory()
    logical = psutil.cpu_count(logical=True) or 1
    physical = psutil.cpu_count(logical=False) or logical
    freq = None
    try:
        f = psutil.cpu_freq()
        if f is not None:
            freq = f.max or f.current or None
    except (OSError, NotImplementedError):
        freq = None
    try:
        battery = psutil.sensors_battery() is not None
    except (OSError, NotImplementedError, AttributeError):
        battery = False
    return HostFacts(
        hostname=socket.gethostname(),
        arch=normalise_arch(platform.machine()),
        cpuinfo=_read(root / "proc/cpuinfo") or "",
        total_bytes=int(vm.total),
        available_bytes=int(vm.available),
        physical_cores=int(physical),
        logical_cpus=int(logical),
        max_mhz=float(freq) if freq else None,
        device_tree_model=_read(root / "proc/device-tree/model"),
        tegra_release=_read(root / "etc/nv_tegra_release"),
        storage_kind=root_storage_kind(root),
        chassis_type=_read(root / "sys/class/dmi/id/chassis_type"),
        has_battery=battery,
        os_release=_read(root / "etc/os-release") or _read(root / "usr/lib/os-release"),
        python=f"{sys.version_info[0]}.{sys.version_info[1]}",
        libc=this_libc(),
    )


def _reference_profile(facts: HostFacts) -> DeviceProfile | None:
    """The shipped profile of the same board family with the closest RAM size, if any."""
    model = facts.device_tree_model or ""
    prefix = None
    m = _PI_RE.search(model)
    if m:
        prefix = f"raspberry-pi-{m.group(1)}-"
    elif facts.tegra_release is not None:
        prefix = next((p for key, p in _JETSON_FAMILIES if key in model), None)
    if prefix is None:
        return None
    family = [p for p in list_profiles() if p.id.startswith(prefix)]
    if not family:
        return None
    total_gib = facts.total_bytes / GIB
    return min(family, key=lambda p: abs(p.memory.total_gib - total_gib))


def _device_class(facts: HostFacts, ref: DeviceProfile | None, isa_flags: str) -> str:
    if ref is not None:
        return ref.device_class
    if facts.has_battery or facts.chassis_type in _LAPTOP_CHASSIS:
        return "laptop"
    if facts.chassis_type in _MINI_PC_CHASSIS:
        return "mini-pc"
    if facts.chassis_type in _SERVER_CHASSIS or "hypervisor" in isa_flags:
        return "server"
    return "desktop"


def build_profile(
    facts: HostFacts,
    *,
    measured_gbps: float | None = None,
    measured_compute: Mapping[int, DecodeRate] | None = None,
    compute_how: str = "",
    now: datetime | None = None,
    profile_id: str = "local",
) -> DeviceProfile:
    """The profile of the machine described by ``facts`` (pure; see the module docstring).

    ``measured_compute`` ({threads: GFLOPS and chunk spread} from
    :func:`~edgepack.device.compute_probe.measure_decode_gflops`) fills
    ``cpu.measured_decode_gflops`` (at ``cores`` threads), ``..._1t`` and their ``..._range``
    spreads; ``compute_how`` says
    how it was obtained, or why it is absent."""
    when = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    stamp = f"detected on {facts.hostname} at {when} by edgepack profiles detect"
    info = parse_cpuinfo(facts.cpuinfo, facts.arch)
    ref = _reference_profile(facts)
    sources: dict[str, str] = {}

    cores, threads = facts.physical_cores, max(facts.logical_cpus, facts.physical_cores)
    mhz = facts.max_mhz or info.mhz
    ghz = round(mhz / 1000, 3) if mhz else DEFAULT_GHZ
    fpc = flop_per_cycle(facts.arch, info.isa)
    peak = round(cores * ghz * fpc, 1)
    clock_basis = "max clock from psutil/cpufreq" if mhz else f"clock unknown, assumed {ghz} GHz"
    sources["cpu.peak_gflops_fp32"] = (
        f"{cores} cores x {ghz} GHz ({clock_basis}) x {fpc} FP32 FLOP/cycle (one FMA pipe of "
        f"the widest vector in the ISA; conservative) = {peak}; {stamp}"
    )
    if ref is not None and ref.cpu.arch == facts.arch:
        # Same SoC as a shipped profile: its sourced per-core figure beats the generic one.
        peak = round(ref.cpu.peak_gflops_fp32 * cores / ref.cpu.cores, 1)
        sources["cpu.peak_gflops_fp32"] = (
            f"{ref.cpu.peak_gflops_fp32} x {cores}/{ref.cpu.cores} cores, from shipped profile "
            f"{ref.id}: {ref.sources.get('cpu.peak_gflops_fp32', '')}"
        )
    model = info.model
    if facts.device_tree_model:
        model = f"{facts.device_tree_model}: {model}"
    cpu = CpuSpec(
        arch=facts.arch,
        model=model,
        cores=cores,
        threads=threads,
        isa=info.isa,
        peak_gflops_fp32=peak,
    )
    for key in ("cpu.model", "cpu.cores", "cpu.threads"):
        sources[key] = f"psutil and /proc/cpuinfo; {stamp}"
    if measured_compute or compute_how:
        cpu = with_measured_compute(cpu, measured_compute or {}, compute_how, stamp, sources)
    sources["cpu.isa"] = (
        f"/proc/cpuinfo {'Features' if facts.arch == 'aarch64' else 'flags'}; {stamp}"
    )

    total = round(facts.total_bytes / GIB, 3)
    reserve = round((facts.total_bytes - facts.available_bytes) / GIB, 3)
    sources["memory.total_gib"] = f"psutil.virtual_memory().total; {stamp}"
    sources["memory.os_reserve_gib"] = (
        f"total - psutil.virtual_memory().available at detect time (usable = what was free "
        f"then); {stamp}"
    )
    mem_type, bandwidth, measured = "unknown", DEFAULT_BANDWIDTH_GBPS, None
    sources["memory.bandwidth_gbps"] = (
        f"unknown on this machine; edgepack's default {DEFAULT_BANDWIDTH_GBPS} GB/s (the "
        "slowest shipped profile, Raspberry Pi 4) so plans under-promise; run with --measure"
    )
    if ref is not None:
        mem_type, bandwidth = ref.memory.type, ref.memory.bandwidth_gbps
        sources["memory.type"] = (
            f"from shipped profile {ref.id}: {ref.sources.get('memory.type', '')}"
        )
        sources["memory.bandwidth_gbps"] = (
            f"from shipped profile {ref.id}: {ref.sources['memory.bandwidth_gbps']}"
        )
        ref_measured = ref.memory.measured_bandwidth_gbps
        # A published figure is reused only for the same RAM size (4 and 8 GB Pi 5 differ).
        if (
            ref_measured is not None
            and abs(ref.memory.total_gib - total) <= 0.1 * ref.memory.total_gib
        ):
            measured = ref_measured
            sources["memory.measured_bandwidth_gbps"] = (
                f"from shipped profile {ref.id}: {ref.sources['memory.measured_bandwidth_gbps']}"
            )
    if measured_gbps is not None:
        measured = round(measured_gbps, 2)
        sources["memory.measured_bandwidth_gbps"] = (
            f"measure_bandwidth(): best single-thread copy of a large bytearray, bytes read + "
            f"written per second; {stamp}"
        )
        if ref is None:
            bandwidth = max(DEFAULT_BANDWIDTH_GBPS, measured)
            sources["memory.bandwidth_gbps"] = (
                f"theoretical peak unknown; max(edgepack default {DEFAULT_BANDWIDTH_GBPS}, "
                f"measured {measured}) GB/s as a lower bound; {stamp}"
            )
    memory = MemorySpec(
        total_gib=total,
        os_reserve_gib=reserve,
        type=mem_type,
        bandwidth_gbps=bandwidth,
        measured_bandwidth_gbps=measured,
    )

    accelerator = AcceleratorSpec()
    if facts.tegra_release is not None:
        if ref is not None and ref.accelerator.kind == "cuda":
            accelerator = ref.accelerator
            for key in (
                "accelerator.compute_capability",
                "accelerator.cuda_cores",
                "accelerator.memory",
                "accelerator.fp16_tflops",
            ):
                if key in ref.sources:
                    sources[key] = f"from shipped profile {ref.id}: {ref.sources[key]}"
        else:
            sources["accelerator.kind"] = (
                f"/etc/nv_tegra_release says this is a Jetson, but the board "
                f"'{facts.device_tree_model}' matches no shipped profile, so its GPU is left "
                f"out (CPU-only plans); write a profile with [accelerator] by hand; {stamp}"
            )

    storage_kind = facts.storage_kind
    if storage_kind == "unknown" and ref is not None:
        storage_kind = ref.storage.kind
        sources["storage.kind"] = f"from shipped profile {ref.id} (root device not classified)"
    else:
        sources["storage.kind"] = f"/sys/dev/block of the device holding /; {stamp}"

    software, software_sources = software_facts(facts.os_release, facts.python, facts.libc,
                                                stamp)
    sources.update(software_sources)
    name = f"{facts.device_tree_model or info.model} ({facts.hostname}, detected)"
    profile = DeviceProfile(
        id=profile_id,
        name=name,
        device_class=_device_class(facts, ref, facts.cpuinfo),
        cpu=cpu,
        memory=memory,
        accelerator=accelerator,
        storage=StorageSpec(kind=storage_kind),
        formats=ref.formats if ref is not None else ("gguf", "onnx"),
        engines=ref.engines if ref is not None else ("llama.cpp", "onnxruntime"),
        sources=sources,
        software=software,
    )
    # Round-trip through the validator so detect never hands out a profile load_profile rejects.
    return parse_profile_dict(
        profile.to_dict(), origin=f"detected profile of {facts.hostname}"
    )


def measure_bandwidth(seconds: float = 2.0, *, size_bytes: int = 256 * 1024 * 1024) -> float:
    """Measured memory bandwidth in GB/s (1e9 bytes/s), counting bytes read + bytes written.

    Copies a ``size_bytes`` bytearray into another through memoryview slices (one memcpy in
    C, single-threaded: CPython holds the GIL) until ``seconds`` have passed, and reports the
    best copy. This is a lower bound of what multi-threaded llama.cpp reads; on a Pi it lands
    near tinymembench's 'C copy' x 2. Buffers shrink to 1/8 of available memory on small
    machines. Runs about ``seconds`` plus one copy. Raises UsageError for seconds <= 0.
    """
    if not seconds > 0:
        raise UsageError(f"measurement time must be > 0 seconds, got {seconds!r}")
    import psutil

    size = min(size_bytes, max(32 * 1024 * 1024, psutil.virtual_memory().available // 8))
    src = bytearray(b"\x5a") * size  # written, so its pages are really mapped
    dst = bytearray(size)
    s, d = memoryview(src), memoryview(dst)
    best = float("inf")
    d[:] = s  # warm-up: fault in dst's pages
    deadline = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        d[:] = s
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() >= deadline:
            break
    s.release()
    d.release()
    return round(2 * size / best / 1e9, 3)


def detect_profile(
    measure: bool = False,
    *,
    seconds: float = 2.0,
    busy: Callable[[], str | None] = machine_busy,
) -> DeviceProfile:
    """The profile of this machine; with ``measure``, measure bandwidth for ``seconds`` and
    llama.cpp's decode compute rate at 1 thread and all physical cores (a few seconds more;
    absent, with the reason in its source, where the GGUF runtime is not installed). A rate
    measured while ``busy()`` names other jobs on the CPUs says so in its source."""
    facts = gather_host_facts()
    if not measure:
        return build_profile(facts)
    measured = measure_bandwidth(seconds)
    rates, how = measure_decode_gflops((1, facts.physical_cores))
    why_busy = (busy() or contended(rates)) if rates is not None else None
    if why_busy is not None:
        how += f" while busy ({why_busy}): likely below the idle figure"
    return build_profile(facts, measured_gbps=measured, measured_compute=rates,
                         compute_how=how)


def with_id(profile: DeviceProfile, profile_id: str) -> DeviceProfile:
    """``profile`` renamed to ``profile_id`` (used when saving it as ``<profile_id>.toml``)."""
    return replace(profile, id=profile_id)
