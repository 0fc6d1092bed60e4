"""Resolve a ``--device`` value: a shipped id, a profile file, or ``local`` (this machine)."""

from __future__ import annotations

from dataclasses import replace

from edgepack.device.catalog import load_profile_ref
from edgepack.device.compute_probe import measure_decode_gflops
from edgepack.device.detect import build_profile, gather_host_facts, measure_bandwidth
from edgepack.device.profile import DeviceProfile


def load_profile(ref: str) -> DeviceProfile:
    """Resolve ``ref``: a shipped id, a path to a .toml file, or ``local`` (this machine,
    its memory bandwidth and llama.cpp decode rate measured once and then cached).

    Raises ProfileError for an unknown id (listing close matches), an unreadable file or an
    invalid profile.
    """
    if ref == "local":
        return local_profile()
    return load_profile_ref(ref)


def local_profile() -> DeviceProfile:
    """The profile ``--device local`` plans for: this machine with its memory bandwidth
    (unless a shipped profile of the same board already carries a published measurement) and
    llama.cpp's decode compute rate at 1 thread and all physical cores, each measured once and
    then cached (see :mod:`edgepack.device.measure_cache`)."""
    from edgepack.device.measure_cache import cached_bandwidth, cached_compute

    facts = gather_host_facts()
    rates, compute_how = cached_compute(
        facts, lambda: measure_decode_gflops((1, facts.physical_cores)))
    profile = build_profile(facts, measured_compute=rates, compute_how=compute_how)
    if profile.memory.measured_bandwidth_gbps is not None:
        return profile
    gbps, how = cached_bandwidth(facts, measure_bandwidth)
    profile = build_profile(facts, measured_gbps=gbps, measured_compute=rates,
                            compute_how=compute_how)
    sources = dict(profile.sources)
    sources["memory.measured_bandwidth_gbps"] += f" ({how})"
    return replace(profile, sources=sources)
