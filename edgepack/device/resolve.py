"""Resolve a ``--device`` value: a shipped id, a profile file, or ``local`` (this machine)."""

from __future__ import annotations

from dataclasses import replace

from edgepack.device.catalog import load_profile_ref
from edgepack.device.compute_probe import measure_decode_gflops
from edgepack.device.detect import build_profile, gather_host_facts, measure_bandwidth
from edgepack.device.profile import DeviceProfile


def load_profile(ref: str, *, decode_rate: bool = True) -> DeviceProfile:
    """Resolve ``ref``: a shipped id, a path to a .toml file, or ``local`` (this machine,
    its memory bandwidth and llama.cpp decode rate measured once and then cached).

    ``decode_rate=False`` leaves ``local``'s llama.cpp decode rate unmeasured (a few seconds
    on first use): for checking the device before the model is known, and for ONNX plans,
    which do not use it (:func:`for_format` adds it once a plan picks GGUF).

    Raises ProfileError for an unknown id (listing close matches), an unreadable file or an
    invalid profile.
    """
    if ref == "local":
        return local_profile(decode_rate=decode_rate)
    return load_profile_ref(ref)


def for_format(ref: str, profile: DeviceProfile, fmt: str) -> DeviceProfile:
    """``profile`` (from ``load_profile(ref, decode_rate=False)``) ready to plan ``fmt``:
    ``local`` gets its llama.cpp decode rate when ``fmt`` is ``gguf``; anything else is
    returned as it is."""
    if ref == "local" and fmt == "gguf":
        return local_profile()
    return profile


def local_profile(*, decode_rate: bool = True) -> DeviceProfile:
    """The profile ``--device local`` plans for: this machine with its memory bandwidth
    (unless a shipped profile of the same board already carries a published measurement) and
    llama.cpp's decode compute rate at 1 thread and all physical cores, each measured once and
    then cached (see :mod:`edgepack.device.measure_cache`). Without ``decode_rate`` the rate
    is not measured and its source says why."""
    from edgepack.device.measure_cache import cached_bandwidth, cached_compute

    facts = gather_host_facts()
    if decode_rate:
        rates, compute_how = cached_compute(
            facts, lambda: measure_decode_gflops((1, facts.physical_cores)))
    else:
        rates, compute_how = None, ("not measured: only llama.cpp (GGUF) plans use it, and "
                                    "this one did not need it")
    profile = build_profile(facts, measured_compute=rates, compute_how=compute_how)
    if profile.memory.measured_bandwidth_gbps is not None:
        return profile
    gbps, how = cached_bandwidth(facts, measure_bandwidth)
    profile = build_profile(facts, measured_gbps=gbps, measured_compute=rates,
                            compute_how=compute_how)
    sources = dict(profile.sources)
    sources["memory.measured_bandwidth_gbps"] += f" ({how})"
    return replace(profile, sources=sources)
