"""Device profiles: what an edge device offers a model, and where each figure came from.

A profile is one TOML file, ``device_profiles/<id>.toml`` for the shipped ones. Schema 1
(validated strictly: unknown keys, wrong types and out-of-range values are errors)::

    schema = 1                          # int, must be 1
    id = "raspberry-pi-5-8gb"           # [a-z0-9][a-z0-9-]*, equals the file name stem
    name = "Raspberry Pi 5 (8 GB)"      # free text
    class = "sbc"                       # sbc | jetson | laptop | mini-pc | desktop | server

    [cpu]
    arch = "aarch64"                    # aarch64 | x86_64
    model = "Broadcom BCM2712, 4x Cortex-A76 @ 2.4 GHz"
    cores = 4                           # int > 0: physical cores = threads the engines use
    threads = 4                         # int >= cores: logical CPUs
    isa = ["neon", "fp16", "dotprod"]   # Arm: neon fp16 dotprod i8mm sve sve2
                                        # x86: sse4_2 avx avx2 fma f16c avx512f avx512_vnni
                                        #      avx512_bf16 avx_vnni amx
    peak_gflops_fp32 = 153.6            # > 0: cores x GHz x FP32 FLOP/cycle (arithmetic in sources)
    target = "cortex-a76"               # optional: the compiler's -mcpu name for this core
                                        # (what the runtime pack compiles llama.cpp for)
    measured_decode_gflops = 16.9       # optional, > 0: llama.cpp Q8_0 decode on `cores`
                                        # threads, 2 x params x tok/s (edgepack.device.
                                        # compute_probe; written by detect --measure, local)
    measured_decode_gflops_1t = 9.8     # optional, > 0: the same on 1 thread
    measured_decode_gflops_range = [15.2, 17.8]     # optional: slowest and fastest chunk of
    measured_decode_gflops_1t_range = [9.1, 10.4]   # the probe (figure = median chunk);
                                        # each needs its figure, low <= figure <= high
    measured_prompt_gflops = 60.2       # optional, > 0: llama.cpp Q8_0 prompt evaluation
    measured_prompt_gflops_1t = 33.5    # (one 128-token batch) on `cores` / 1 thread, and
    measured_prompt_gflops_range = [55.0, 61.9]     # their spreads, as for decode
    measured_prompt_gflops_1t_range = [31.0, 34.4]

    [memory]
    total_gib = 8.0                     # > 0
    os_reserve_gib = 0.75               # >= 0 and < total: what the OS keeps (basis in sources)
    type = "LPDDR4X-4267"               # free text
    bandwidth_gbps = 17.07              # > 0: theoretical peak, GB/s (1e9 bytes/s)
    measured_bandwidth_gbps = 11.1      # optional, > 0: a published or local measurement,
                                        # counting bytes read + bytes written (STREAM convention)

    [accelerator]
    kind = "none"                       # none | cuda
    # cuda only: compute_capability = "8.7" (required), memory = "shared" | "dedicated"
    # (required), memory_gib = 8.0 (required for dedicated, forbidden for shared),
    # fp16_tflops = ... (optional), cuda_cores = 1024 (optional)

    [storage]
    kind = "microsd"                    # microsd | emmc | nvme | sata-ssd | usb | unknown
    read_mbps = 90                      # optional, > 0 (MB/s)

    [preferences]
    formats = ["gguf", "onnx"]          # ordered, non-empty, no repeats: gguf | onnx
    engines = ["llama.cpp", "onnxruntime"]

    [software]                          # optional; all three or none: what the device runs,
    os = "debian-12"                    # os-release ID-VERSION_ID (Raspberry Pi OS Bookworm)
    python = "3.11"                     # the system python3, MAJOR.MINOR
    libc = "glibc-2.36"                 # glibc-MAJOR.MINOR (sets the manylinux wheel tags)

    [sources]                           # dotted field name -> where the figure came from
    "cpu.model" = "https://... (what it says)"

Every numeric field that is present, plus ``cpu.isa`` and ``accelerator.compute_capability``,
must have an entry in ``[sources]``; a source key that names no field is an error (typos).
``storage.kind = "unknown"`` is written only by ``edgepack profiles detect`` when the root
device cannot be classified.

Invalid profiles raise :class:`~edgepack.errors.ProfileError` naming the file, the field, the bad
value and what was expected. This module holds the types only and imports no other profile module:
:mod:`edgepack.device.validation` checks data against the schema, :mod:`edgepack.device.catalog`
loads files, :mod:`edgepack.device.detect` profiles this machine. Device-side: stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

SCHEMA_VERSION = 1
DEVICE_CLASSES = ("sbc", "jetson", "laptop", "mini-pc", "desktop", "server")
ARCHES = ("aarch64", "x86_64")
ARM_ISA = ("neon", "fp16", "dotprod", "i8mm", "sve", "sve2")
X86_ISA = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx",
)
ISA_FLAGS = ARM_ISA + X86_ISA
ACCELERATOR_KINDS = ("none", "cuda")
ACCELERATOR_MEMORY = ("shared", "dedicated")
STORAGE_KINDS = ("microsd", "emmc", "nvme", "sata-ssd", "usb", "unknown")
FORMATS = ("gguf", "onnx")
ENGINES = ("llama.cpp", "onnxruntime")

# When only the theoretical peak is known, plan with this fraction of it. Sustained copy
# bandwidth measured with STREAM reaches 67-79% of the DDR wire rate on TI AM64x boards
# (TI SPRACV1B: copy 78% on DDR4-1600, 69% on LPDDR4-1600, triad 74% / 67%; see
# https://ti.com/document-viewer/lit/html/SPRACV1B/GUID-A0A441DF-C77D-4815-BFAA-2D5EC098B345)
# and the
# published Pi figures shipped here reach 65% (Pi 5 8 GB: 11.1 of 17.07 GB/s) and 43% (Pi 4:
# 5.5 of 12.8 GB/s). 0.6 sits at the low end of the well-behaved cases so plans under-promise.
BANDWIDTH_DERATING = 0.6


# The figures `profiles detect --measure` and `--device local` measure (compute_probe.py) and
# the software a runtime pack is built for; sourced when present, like those below.
MEASURED_AND_SOFTWARE_FIELDS = (
    "cpu.measured_decode_gflops",
    "cpu.measured_decode_gflops_1t",
    "cpu.measured_decode_gflops_range",
    "cpu.measured_decode_gflops_1t_range",
    "cpu.measured_prompt_gflops",
    "cpu.measured_prompt_gflops_1t",
    "cpu.measured_prompt_gflops_range",
    "cpu.measured_prompt_gflops_1t_range",
    "software.os",
    "software.python",
    "software.libc",
)
# Fields that must carry a source when present (the figures a plan depends on).
SOURCED_FIELDS = (
    "cpu.cores",
    "cpu.threads",
    "cpu.isa",
    "cpu.peak_gflops_fp32",
    "memory.total_gib",
    "memory.os_reserve_gib",
    "memory.bandwidth_gbps",
    "memory.measured_bandwidth_gbps",
    "accelerator.compute_capability",
    "accelerator.memory_gib",
    "accelerator.fp16_tflops",
    "accelerator.cuda_cores",
    "storage.read_mbps",
    "cpu.target",
    *MEASURED_AND_SOFTWARE_FIELDS,
)
KNOWN_FIELDS = (
    "schema",
    "id",
    "name",
    "class",
    "cpu.arch",
    "cpu.model",
    "cpu.cores",
    "cpu.threads",
    "cpu.isa",
    "cpu.peak_gflops_fp32",
    "memory.total_gib",
    "memory.os_reserve_gib",
    "memory.type",
    "memory.bandwidth_gbps",
    "memory.measured_bandwidth_gbps",
    "accelerator.kind",
    "accelerator.compute_capability",
    "accelerator.memory",
    "accelerator.memory_gib",
    "accelerator.fp16_tflops",
    "accelerator.cuda_cores",
    "storage.kind",
    "storage.read_mbps",
    "preferences.formats",
    "preferences.engines",
    "cpu.target",
    *MEASURED_AND_SOFTWARE_FIELDS,
)


@dataclass(frozen=True)
class CpuSpec:
    arch: str
    model: str
    cores: int
    threads: int
    isa: tuple[str, ...]
    peak_gflops_fp32: float
    target: str | None = None  # gcc/clang -mcpu name, e.g. cortex-a76
    # llama.cpp's measured Q8_0 decode rate, GFLOPS, on `cores` threads and on 1 thread
    measured_decode_gflops: float | None = None
    measured_decode_gflops_1t: float | None = None
    # (slowest, fastest) chunk of the measurement whose median is the figure above
    measured_decode_gflops_range: tuple[float, float] | None = None
    measured_decode_gflops_1t_range: tuple[float, float] | None = None
    # llama.cpp's measured Q8_0 prompt (prefill) rate, GFLOPS, and spreads, as above
    measured_prompt_gflops: float | None = None
    measured_prompt_gflops_1t: float | None = None
    measured_prompt_gflops_range: tuple[float, float] | None = None
    measured_prompt_gflops_1t_range: tuple[float, float] | None = None

    def has(self, flag: str) -> bool:
        """True when the CPU implements ISA extension ``flag`` (a name from ISA_FLAGS)."""
        return flag in self.isa


@dataclass(frozen=True)
class MemorySpec:
    total_gib: float
    os_reserve_gib: float
    type: str
    bandwidth_gbps: float
    measured_bandwidth_gbps: float | None = None

    @property
    def usable_gib(self) -> float:
        """Memory left for edgepack after the OS reserve (always > 0 for a valid profile)."""
        return round(self.total_gib - self.os_reserve_gib, 3)


@dataclass(frozen=True)
class AcceleratorSpec:
    kind: str = "none"
    compute_capability: str | None = None
    memory: str | None = None
    memory_gib: float | None = None
    fp16_tflops: float | None = None
    cuda_cores: int | None = None


@dataclass(frozen=True)
class StorageSpec:
    kind: str
    read_mbps: float | None = None


@dataclass(frozen=True)
class SoftwareSpec:
    """What the device runs: the runtime pack picks its wheels by these."""

    os: str  # os-release ID-VERSION_ID, e.g. debian-12, ubuntu-22.04
    python: str  # MAJOR.MINOR of the system python3
    libc: str  # glibc-MAJOR.MINOR

    @property
    def glibc(self) -> tuple[int, int]:
        major, minor = self.libc.removeprefix("glibc-").split(".")
        return int(major), int(minor)


@dataclass(frozen=True)
class DeviceProfile:
    id: str
    name: str
    device_class: str
    cpu: CpuSpec
    memory: MemorySpec
    accelerator: AcceleratorSpec
    storage: StorageSpec
    formats: tuple[str, ...]
    engines: tuple[str, ...]
    # Dotted field name -> source text. Excluded from hashing (a dict is unhashable);
    # profile_digest() covers it.
    sources: Mapping[str, str] = field(default_factory=dict, hash=False)
    schema: int = SCHEMA_VERSION
    software: SoftwareSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        """The profile as plain JSON-able data in schema order (from_dict's inverse)."""
        cpu = {
            "arch": self.cpu.arch,
            "model": self.cpu.model,
            "cores": self.cpu.cores,
            "threads": self.cpu.threads,
            "isa": list(self.cpu.isa),
            "peak_gflops_fp32": self.cpu.peak_gflops_fp32,
        }
        for key in ("target", "measured_decode_gflops", "measured_decode_gflops_1t",
                    "measured_decode_gflops_range", "measured_decode_gflops_1t_range",
                    "measured_prompt_gflops", "measured_prompt_gflops_1t",
                    "measured_prompt_gflops_range", "measured_prompt_gflops_1t_range"):
            value = getattr(self.cpu, key)
            if value is not None:
                cpu[key] = list(value) if isinstance(value, tuple) else value
        memory: dict[str, Any] = {
            "total_gib": self.memory.total_gib,
            "os_reserve_gib": self.memory.os_reserve_gib,
            "type": self.memory.type,
            "bandwidth_gbps": self.memory.bandwidth_gbps,
        }
        if self.memory.measured_bandwidth_gbps is not None:
            memory["measured_bandwidth_gbps"] = self.memory.measured_bandwidth_gbps
        acc = self.accelerator
        accelerator: dict[str, Any] = {"kind": acc.kind}
        for key in ("compute_capability", "memory", "memory_gib", "fp16_tflops", "cuda_cores"):
            if getattr(acc, key) is not None:
                accelerator[key] = getattr(acc, key)
        storage: dict[str, Any] = {"kind": self.storage.kind}
        if self.storage.read_mbps is not None:
            storage["read_mbps"] = self.storage.read_mbps
        out: dict[str, Any] = {
            "schema": self.schema,
            "id": self.id,
            "name": self.name,
            "class": self.device_class,
            "cpu": cpu,
            "memory": memory,
            "accelerator": accelerator,
            "storage": storage,
            "preferences": {"formats": list(self.formats), "engines": list(self.engines)},
        }
        if self.software is not None:
            sw = self.software
            out["software"] = {"os": sw.os, "python": sw.python, "libc": sw.libc}
        out["sources"] = {k: self.sources[k] for k in sorted(self.sources)}
        return out


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if key == "sources" and not prefix:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def flatten_profile(profile: DeviceProfile) -> dict[str, Any]:
    """Dotted field name -> value for every field present (sources excluded)."""
    return _flatten(profile.to_dict())


# --------------------------------------------------------------------------- derived figures


def profile_digest(profile: DeviceProfile) -> str:
    """``sha256:<hex>`` of the canonical JSON of to_dict(), so a manifest can pin a profile."""
    canonical = json.dumps(
        profile.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def effective_bandwidth_gbps(profile: DeviceProfile) -> float:
    """Memory bandwidth to plan with, GB/s: the measured figure if the profile has one, else
    the theoretical peak x BANDWIDTH_DERATING (see the constant for why 0.6)."""
    m = profile.memory
    if m.measured_bandwidth_gbps is not None:
        return m.measured_bandwidth_gbps
    return round(m.bandwidth_gbps * BANDWIDTH_DERATING, 3)


def _at_threads(cpu: CpuSpec, points: dict[int, float], threads: int) -> float | None:
    if not points:
        return None
    t = max(1, min(threads, cpu.cores))
    if t in points:
        return points[t]
    if len(points) == 2:
        g1, gn = points[1], points[cpu.cores]
        return g1 + (gn - g1) * (t - 1) / (cpu.cores - 1)
    ((n, g),) = points.items()
    return g * t / n


def decode_gflops_at(cpu: CpuSpec, threads: int, kind: str = "decode") -> float | None:
    """llama.cpp's measured Q8_0 decode rate (``kind="prompt"``: prompt rate) on ``threads``
    threads, GFLOPS, or None when the profile has no measurement. A figure measured at that
    thread count wins; between 1 and ``cores`` threads the two measurements are interpolated
    linearly; with one figure only, it is scaled by threads / its thread count. More threads
    than cores get the cores' figure (llama.cpp gains nothing from a second hardware thread per
    core)."""
    name = f"measured_{kind}_gflops"
    return _at_threads(cpu, {n: g for n, g in ((1, getattr(cpu, f"{name}_1t")),
                                               (cpu.cores, getattr(cpu, name)))
                             if g is not None}, threads)


def decode_range_at(cpu: CpuSpec, threads: int, kind: str = "decode") -> tuple[float, float] | None:
    """The (slowest, fastest) spread of :func:`decode_gflops_at`'s figure, by the same rules,
    or None when a measurement it uses has no recorded spread."""
    name = f"measured_{kind}_gflops"
    spreads = {n: (g, r) for n, g, r in ((1, getattr(cpu, f"{name}_1t"),
                                          getattr(cpu, f"{name}_1t_range")),
                                         (cpu.cores, getattr(cpu, name),
                                          getattr(cpu, f"{name}_range"))) if g is not None}
    if not spreads or any(r is None for _, r in spreads.values()):
        return None
    ends = [_at_threads(cpu, {n: r[i] for n, (_, r) in spreads.items() if r}, threads)
            for i in (0, 1)]
    return None if ends[0] is None or ends[1] is None else (round(ends[0], 2),
                                                          round(ends[1], 2))


def with_threads(profile: DeviceProfile, threads: int) -> DeviceProfile:
    """``profile`` as seen by an engine restricted to ``threads`` threads (1 <= threads <=
    cores): the nominal peak scales with the threads, the measured decode rate and its spread
    follow :func:`decode_gflops_at` (measured per-thread figures before proportional
    scaling)."""
    cpu = profile.cpu
    if not 1 <= threads <= cpu.cores:
        raise ValueError(f"threads must be within 1..{cpu.cores}, got {threads}")
    return replace(profile, cpu=replace(
        cpu,
        cores=threads,
        peak_gflops_fp32=cpu.peak_gflops_fp32 * threads / cpu.cores,
        measured_decode_gflops=decode_gflops_at(cpu, threads),
        measured_decode_gflops_range=decode_range_at(cpu, threads),
        measured_prompt_gflops=decode_gflops_at(cpu, threads, "prompt"),
        measured_prompt_gflops_range=decode_range_at(cpu, threads, "prompt"),
    ))


def derived_figures(profile: DeviceProfile) -> dict[str, Any]:
    """Figures computed from a profile, for --json output (never read back)."""
    return {
        "usable_gib": profile.memory.usable_gib,
        "effective_bandwidth_gbps": effective_bandwidth_gbps(profile),
        "bandwidth_basis": "measured"
        if profile.memory.measured_bandwidth_gbps is not None
        else f"theoretical x {BANDWIDTH_DERATING}",
        "decode_gflops": decode_gflops_at(profile.cpu, profile.cpu.cores),
        "decode_gflops_range": decode_range_at(profile.cpu, profile.cpu.cores),
        "prompt_gflops": decode_gflops_at(profile.cpu, profile.cpu.cores, "prompt"),
        "prompt_gflops_range": decode_range_at(profile.cpu, profile.cpu.cores, "prompt"),
        "compute_basis": "measured (llama.cpp Q8_0 decode)"
        if profile.cpu.measured_decode_gflops is not None
        or profile.cpu.measured_decode_gflops_1t is not None
        else "nominal peak (the planner applies its fraction)",
        "digest": profile_digest(profile),
    }


# --------------------------------------------------------------------------- TOML output


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        # A JSON string is a valid TOML basic string (same escapes, \uXXXX included).
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _toml_key(k: str) -> str:
    return k if re.match(r"^[A-Za-z0-9_-]+$", k) else json.dumps(k, ensure_ascii=False)


def profile_to_toml(profile: DeviceProfile) -> str:
    """TOML text for ``profile`` that parse_profile_toml reads back to an equal profile."""
    d = profile.to_dict()
    lines = [f"{_toml_key(k)} = {_toml_value(d[k])}" for k in ("schema", "id", "name", "class")]
    for table in ("cpu", "memory", "accelerator", "storage", "preferences", "software",
                  "sources"):
        if table not in d:
            continue
        lines.append("")
        lines.append(f"[{table}]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in d[table].items())
    return "\n".join(lines) + "\n"
