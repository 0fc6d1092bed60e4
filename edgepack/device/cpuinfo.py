"""/proc/cpuinfo in edgepack's terms: the CPU model (Arm cores by MIDR part), the ISA
extensions every core has, the clock, and a conservative FLOP/cycle. Pure functions of the
text, so they are tested with stored cpuinfo of other machines. Device side: stdlib only."""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgepack.device.profile import ARM_ISA, X86_ISA
from edgepack.errors import ProfileError

# Kernel flag -> edgepack ISA name. Arm kernels spell features differently from Arm's manuals.
_ARM_FLAGS = {
    "asimd": "neon",
    "asimdhp": "fp16",
    "fphp": "fp16",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "sve": "sve",
    "sve2": "sve2",
}
_X86_FLAGS = {
    "sse4_2": "sse4_2",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx512f": "avx512f",
    "avx512_vnni": "avx512_vnni",
    "avx512_bf16": "avx512_bf16",
    "avx_vnni": "avx_vnni",
    "amx_tile": "amx",
}
# MIDR part numbers of Arm Ltd cores (implementer 0x41), from the cores' TRMs.
_ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78",
    "0xd42": "Cortex-A78AE",
    "0xd44": "Cortex-X1",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd49": "Neoverse-N2",
    "0xd4f": "Neoverse-V2",
}

@dataclass(frozen=True)
class CpuInfo:
    """What /proc/cpuinfo says, in edgepack's terms."""

    model: str
    isa: tuple[str, ...]
    mhz: float | None


def normalise_arch(machine: str) -> str:
    """``platform.machine()`` -> aarch64 | x86_64. Raises ProfileError for other CPUs."""
    m = machine.lower()
    if m in ("x86_64", "amd64"):
        return "x86_64"
    if m in ("aarch64", "arm64"):
        return "aarch64"
    raise ProfileError(
        f"cannot profile this machine: CPU architecture '{machine}' is not supported; "
        "expected aarch64 or x86_64",
        hint="on a Raspberry Pi, install the 64-bit Raspberry Pi OS",
    )


def parse_cpuinfo(text: str, arch: str) -> CpuInfo:
    """Parse /proc/cpuinfo ``text`` from an ``arch`` machine (aarch64 | x86_64).

    ISA flags are the intersection over all CPUs listed, so a big.LITTLE machine reports
    what every core can run.
    """
    blocks = [b for b in re.split(r"\n\s*\n", text) if b.strip()]
    flag_key = "features" if arch == "aarch64" else "flags"
    table = _ARM_FLAGS if arch == "aarch64" else _X86_FLAGS
    order = ARM_ISA if arch == "aarch64" else X86_ISA
    common: set[str] | None = None
    model = ""
    parts: list[str] = []
    mhz: float | None = None
    for block in blocks:
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip().lower()] = value.strip()
        if flag_key in fields:
            flags = set(fields[flag_key].split())
            common = flags if common is None else common & flags
        model = model or fields.get("model name", "")
        if "cpu part" in fields and fields.get("cpu implementer", "0x41") == "0x41":
            parts.append(_ARM_PARTS.get(fields["cpu part"], f"Arm part {fields['cpu part']}"))
        if mhz is None and "cpu mhz" in fields:
            try:
                mhz = float(fields["cpu mhz"])
            except ValueError:
                mhz = None
    names = {table[f] for f in (common or set()) if f in table}
    if not model and parts:
        counts = {p: parts.count(p) for p in dict.fromkeys(parts)}
        model = " + ".join(f"{n}x {p}" for p, n in counts.items())
    return CpuInfo(model=model or "unknown CPU", isa=tuple(f for f in order if f in names), mhz=mhz)


def flop_per_cycle(arch: str, isa: tuple[str, ...]) -> int:
    """A conservative FP32 FLOP/cycle/core for a CPU with ``isa``: one FMA pipe of the widest
    vector the ISA has (cores with two pipes, e.g. Cortex-A76 or Zen 4, do twice this)."""
    if arch == "aarch64":
        return 8  # one 128-bit FMLA: 4 lanes x 2 FLOP
    if "avx512f" in isa:
        return 32  # one 512-bit FMA (or two 256-bit on Zen 4)
    if "avx2" in isa or "avx" in isa:
        return 16  # one 256-bit FMA, or a 256-bit add + mul
    return 8
