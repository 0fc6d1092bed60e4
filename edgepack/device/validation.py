"""Strict checks of device-profile schema 1 (the schema is in edgepack.device.profile' docstring).

Every failure raises ProfileError naming the origin (file), the dotted field, the bad value and
what was expected. Device-side: stdlib only.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

from edgepack.device.profile import (
    ACCELERATOR_KINDS,
    ACCELERATOR_MEMORY,
    ARCHES,
    ARM_ISA,
    DEVICE_CLASSES,
    ENGINES,
    FORMATS,
    KNOWN_FIELDS,
    SCHEMA_VERSION,
    SOURCED_FIELDS,
    STORAGE_KINDS,
    X86_ISA,
    AcceleratorSpec,
    CpuSpec,
    DeviceProfile,
    MemorySpec,
    SoftwareSpec,
    StorageSpec,
    flatten_profile,
)
from edgepack.errors import ProfileError

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_CC_RE = re.compile(r"^\d+\.\d+$")
_TARGET_RE = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
_OS_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*-[0-9][0-9.]*$")
_PY_RE = re.compile(r"^3\.\d{1,2}$")
_LIBC_RE = re.compile(r"^glibc-\d+\.\d+$")


class Validator:
    """Strict schema-1 checks; every failure names the origin and the dotted field."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def fail(self, where: str, value: Any, expected: str) -> ProfileError:
        shown = "missing" if value is MISSING else f"{value!r}"
        return ProfileError(
            f"invalid device profile {self.origin}: field '{where}' is {shown}; "
            f"expected {expected}",
            hint="fix the field (the schema is in the edgepack.device.profile docstring), or "
            "compare with a shipped profile: edgepack profiles show raspberry-pi-5-8gb",
        )

    def table(self, data: Any, where: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(data, Mapping):
            raise self.fail(where, data, "a table")
        for key in data:
            if key not in allowed:
                raise self.fail(
                    f"{where}.{key}" if where else key,
                    data[key],
                    f"no such field (known: {', '.join(allowed)})",
                )
        return data

    def get(self, t: Mapping[str, Any], key: str, where: str, *, optional: bool = False) -> Any:
        if key not in t:
            if optional:
                return None
            raise self.fail(where, MISSING, "a value (required field)")
        return t[key]

    def string(
        self,
        t: Mapping[str, Any],
        key: str,
        where: str,
        choices: tuple[str, ...] = (),
        optional: bool = False,
    ) -> Any:
        v = self.get(t, key, where, optional=optional)
        if v is None and optional:
            return None
        if not isinstance(v, str) or not v.strip():
            raise self.fail(where, v, "a non-empty string")
        if choices and v not in choices:
            raise self.fail(where, v, f"one of {', '.join(choices)}")
        return v

    def number(
        self,
        t: Mapping[str, Any],
        key: str,
        where: str,
        *,
        integer: bool = False,
        minimum: float = 0.0,
        allow_zero: bool = False,
        optional: bool = False,
    ) -> Any:
        v = self.get(t, key, where, optional=optional)
        if v is None and optional:
            return None
        # bool is an int subclass; `cores = true` is a mistake, not 1.
        ok_type = (int,) if integer else (int, float)
        if isinstance(v, bool) or not isinstance(v, ok_type):
            raise self.fail(where, v, "an integer" if integer else "a number")
        if v < minimum or (v == minimum and not allow_zero) or v != v or v == float("inf"):
            bound = f">= {minimum:g}" if allow_zero else f"> {minimum:g}"
            raise self.fail(where, v, f"a finite number {bound}")
        return v if integer else float(v)

    def strings(
        self,
        t: Mapping[str, Any],
        key: str,
        where: str,
        choices: tuple[str, ...],
        *,
        allow_empty: bool = False,
    ) -> tuple[str, ...]:
        v = self.get(t, key, where)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self.fail(where, v, "a list of strings")
        if not v and not allow_empty:
            raise self.fail(where, v, f"a non-empty list of {', '.join(choices)}")
        for x in v:
            if x not in choices:
                raise self.fail(where, x, f"one of {', '.join(choices)}")
        if len(set(v)) != len(v):
            raise self.fail(where, v, "a list without repeats")
        return tuple(v)

    def profile(self, data: Any) -> DeviceProfile:
        top = self.table(
            data,
            "",
            (
                "schema",
                "id",
                "name",
                "class",
                "cpu",
                "memory",
                "accelerator",
                "storage",
                "preferences",
                "software",
                "sources",
            ),
        )
        schema = self.get(top, "schema", "schema")
        if isinstance(schema, bool) or schema != SCHEMA_VERSION:
            raise self.fail("schema", schema, f"{SCHEMA_VERSION} (the schema this edgepack reads)")
        pid = self.string(top, "id", "id")
        if not _ID_RE.match(pid):
            raise self.fail("id", pid, "lowercase letters, digits and '-' (e.g. my-board-8gb)")
        name = self.string(top, "name", "name")
        device_class = self.string(top, "class", "class", DEVICE_CLASSES)
        cpu = self.cpu(self.get(top, "cpu", "cpu"))
        memory = self.memory(self.get(top, "memory", "memory"))
        accelerator = self.accelerator(self.get(top, "accelerator", "accelerator"))
        st = self.table(self.get(top, "storage", "storage"), "storage", ("kind", "read_mbps"))
        storage = StorageSpec(
            kind=self.string(st, "kind", "storage.kind", STORAGE_KINDS),
            read_mbps=self.number(st, "read_mbps", "storage.read_mbps", optional=True),
        )
        pref = self.table(
            self.get(top, "preferences", "preferences"), "preferences", ("formats", "engines")
        )
        formats = self.strings(pref, "formats", "preferences.formats", FORMATS)
        engines = self.strings(pref, "engines", "preferences.engines", ENGINES)
        sources = self.sources(self.get(top, "sources", "sources"))
        software = self.software(top["software"]) if "software" in top else None
        profile = DeviceProfile(
            id=pid,
            name=name,
            device_class=device_class,
            cpu=cpu,
            memory=memory,
            accelerator=accelerator,
            storage=storage,
            formats=formats,
            engines=engines,
            sources=sources,
            software=software,
        )
        self.check_sourced(profile)
        return profile

    def cpu(self, data: Any) -> CpuSpec:
        t = self.table(
            data, "cpu", ("arch", "model", "cores", "threads", "isa", "peak_gflops_fp32",
                          "target", "measured_decode_gflops", "measured_decode_gflops_1t",
                          "measured_decode_gflops_range", "measured_decode_gflops_1t_range",
                          "measured_prompt_gflops", "measured_prompt_gflops_1t",
                          "measured_prompt_gflops_range", "measured_prompt_gflops_1t_range")
        )
        arch = self.string(t, "arch", "cpu.arch", ARCHES)
        cores = self.number(t, "cores", "cpu.cores", integer=True)
        threads = self.number(t, "threads", "cpu.threads", integer=True)
        if threads < cores:
            raise self.fail("cpu.threads", threads, f"an integer >= cpu.cores ({cores})")
        # An Arm flag on an x86 CPU (or the reverse) is a copy-paste error, not a feature.
        isa = self.strings(
            t, "isa", "cpu.isa", ARM_ISA if arch == "aarch64" else X86_ISA, allow_empty=True
        )
        measured: dict[str, Any] = {}
        for kind in ("decode", "prompt"):
            for name in (f"measured_{kind}_gflops", f"measured_{kind}_gflops_1t"):
                measured[name] = self.number(t, name, f"cpu.{name}", optional=True)
                measured[f"{name}_range"] = self.spread(t, name, measured[name])
        return CpuSpec(
            arch=arch,
            model=self.string(t, "model", "cpu.model"),
            cores=cores,
            threads=threads,
            isa=isa,
            peak_gflops_fp32=self.number(t, "peak_gflops_fp32", "cpu.peak_gflops_fp32"),
            target=self.target(t) if "target" in t else None,
            **measured,
        )

    def spread(self, t: Mapping[str, Any], figure_key: str,
               figure: float | None) -> tuple[float, float] | None:
        """``<figure_key>_range``: [slowest, fastest] chunk around the measured figure."""
        key = f"{figure_key}_range"
        where = f"cpu.{key}"
        if key not in t:
            return None
        v = t[key]
        if (not isinstance(v, list) or len(v) != 2
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v)):
            raise self.fail(where, v, "a list of two numbers [slowest, fastest] (GFLOPS)")
        low, high = float(v[0]), float(v[1])
        if not 0 < low <= high < float("inf"):
            raise self.fail(where, v, "[slowest, fastest] with 0 < slowest <= fastest")
        if figure is None:
            raise self.fail(where, v, f"no range without its figure: add cpu.{figure_key} "
                            "or remove the range")
        if not low <= figure <= high:
            raise self.fail(where, v, f"a range around cpu.{figure_key} = {figure:g} "
                            "(slowest <= figure <= fastest)")
        return low, high

    def target(self, t: Mapping[str, Any]) -> str:
        value = self.string(t, "target", "cpu.target")
        if not _TARGET_RE.match(value):
            raise self.fail("cpu.target", value, "a compiler -mcpu name such as cortex-a76 "
                            "(lowercase letters, digits, '-', '.', '+')")
        return value

    def software(self, data: Any) -> SoftwareSpec:
        t = self.table(data, "software", ("os", "python", "libc"))
        os_id = self.string(t, "os", "software.os")
        if not _OS_RE.match(os_id):
            raise self.fail("software.os", os_id, "os-release ID-VERSION_ID, e.g. debian-12")
        python = self.string(t, "python", "software.python")
        if not _PY_RE.match(python):
            raise self.fail("software.python", python, "MAJOR.MINOR of CPython 3, e.g. 3.11")
        libc = self.string(t, "libc", "software.libc")
        if not _LIBC_RE.match(libc):
            raise self.fail("software.libc", libc, "glibc-MAJOR.MINOR, e.g. glibc-2.36 (musl "
                            "devices are not supported by the runtime pack)")
        return SoftwareSpec(os=os_id, python=python, libc=libc)

    def memory(self, data: Any) -> MemorySpec:
        t = self.table(
            data,
            "memory",
            ("total_gib", "os_reserve_gib", "type", "bandwidth_gbps", "measured_bandwidth_gbps"),
        )
        total = self.number(t, "total_gib", "memory.total_gib")
        reserve = self.number(t, "os_reserve_gib", "memory.os_reserve_gib", allow_zero=True)
        if total - reserve <= 0:
            raise self.fail(
                "memory.os_reserve_gib",
                reserve,
                f"less than memory.total_gib ({total:g}) so that usable memory is > 0",
            )
        return MemorySpec(
            total_gib=total,
            os_reserve_gib=reserve,
            type=self.string(t, "type", "memory.type"),
            bandwidth_gbps=self.number(t, "bandwidth_gbps", "memory.bandwidth_gbps"),
            measured_bandwidth_gbps=self.number(
                t, "measured_bandwidth_gbps", "memory.measured_bandwidth_gbps", optional=True
            ),
        )

    def accelerator(self, data: Any) -> AcceleratorSpec:
        t = self.table(
            data,
            "accelerator",
            ("kind", "compute_capability", "memory", "memory_gib", "fp16_tflops", "cuda_cores"),
        )
        kind = self.string(t, "kind", "accelerator.kind", ACCELERATOR_KINDS)
        if kind == "none":
            for key in ("compute_capability", "memory", "memory_gib", "fp16_tflops", "cuda_cores"):
                if key in t:
                    raise self.fail(
                        f"accelerator.{key}", t[key], "no value when accelerator.kind is 'none'"
                    )
            return AcceleratorSpec()
        cc = self.string(t, "compute_capability", "accelerator.compute_capability")
        if not _CC_RE.match(cc):
            raise self.fail("accelerator.compute_capability", cc, "'major.minor', e.g. '8.7'")
        mem = self.string(t, "memory", "accelerator.memory", ACCELERATOR_MEMORY)
        mem_gib = self.number(t, "memory_gib", "accelerator.memory_gib", optional=True)
        if mem == "dedicated" and mem_gib is None:
            raise self.fail(
                "accelerator.memory_gib",
                MISSING,
                "the GPU's own memory in GiB when accelerator.memory is 'dedicated'",
            )
        if mem == "shared" and mem_gib is not None:
            raise self.fail(
                "accelerator.memory_gib",
                mem_gib,
                "no value when accelerator.memory is 'shared' (memory.total_gib "
                "is the GPU's memory too)",
            )
        return AcceleratorSpec(
            kind=kind,
            compute_capability=cc,
            memory=mem,
            memory_gib=mem_gib,
            fp16_tflops=self.number(t, "fp16_tflops", "accelerator.fp16_tflops", optional=True),
            cuda_cores=self.number(
                t, "cuda_cores", "accelerator.cuda_cores", integer=True, optional=True
            ),
        )

    def sources(self, data: Any) -> dict[str, str]:
        if not isinstance(data, Mapping):
            raise self.fail("sources", data, "a table of dotted field name -> source text")
        out: dict[str, str] = {}
        for key, text in data.items():
            if key not in KNOWN_FIELDS:
                close = difflib.get_close_matches(key, KNOWN_FIELDS, n=1)
                expected = (
                    f"a known field name (did you mean '{close[0]}'?)"
                    if close
                    else ("a known field name such as 'memory.bandwidth_gbps'")
                )
                raise self.fail(f"sources.{key}", text, expected)
            if not isinstance(text, str) or not text.strip():
                raise self.fail(
                    f"sources.{key}", text, "a non-empty string saying where the figure comes from"
                )
            out[key] = text
        return out

    def check_sourced(self, profile: DeviceProfile) -> None:
        flat = flatten_profile(profile)
        missing = [f for f in SOURCED_FIELDS if f in flat and f not in profile.sources]
        if missing:
            raise self.fail(
                f"sources.{missing[0]}",
                MISSING,
                "a source for every figure (missing: " + ", ".join(missing) + ")",
            )


class _Missing:
    def __repr__(self) -> str:
        return "missing"


MISSING: Any = _Missing()


def parse_profile_dict(data: Mapping[str, Any], *, origin: str = "<dict>") -> DeviceProfile:
    """Validate ``data`` against schema 1 and build a profile.

    Raises ProfileError naming ``origin`` (a file path or description), the dotted field,
    the bad value and what was expected.
    """
    return Validator(origin).profile(data)
