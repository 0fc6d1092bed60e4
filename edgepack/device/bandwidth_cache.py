"""A cached memory-bandwidth measurement of this machine, for ``--device local``.

``plan``/``build --device local`` must not plan with a placeholder bandwidth (a 2-vCPU build VM
measured 14 GB/s where the placeholder said 12.8 x 0.6), nor spend seconds measuring on every
call. :func:`cached_bandwidth` measures once (:func:`edgepack.device.detect.measure_bandwidth`,
about 2 s) and keeps the figure in ``$EDGEPACK_HOME/bandwidth.json`` for
:data:`MAX_AGE_SECONDS`, keyed by what identifies the machine (host, CPU model, cores, RAM):
a changed machine measures again. A measurement taken while other jobs hold the CPUs is used
once and not stored. A cache file that cannot be read or written is ignored (the
figure is then measured each time), never an error.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from edgepack.paths import edgepack_home

MAX_AGE_SECONDS = 7 * 24 * 3600
MEASURE_SECONDS = 2.0
_FILE = "bandwidth.json"


def machine_key(facts: Any) -> str:
    """What must stay the same for a stored figure to be reused."""
    model = next(
        (line.split(":", 1)[1].strip() for line in facts.cpuinfo.splitlines()
         if line.lower().startswith(("model name", "hardware", "cpu part"))),
        "",
    )
    return (f"{facts.hostname}|{facts.arch}|{model}|{facts.physical_cores}|"
            f"{facts.logical_cpus}|{facts.total_bytes}")


def machine_busy() -> str | None:
    """Why a measurement now would not describe the machine (other jobs hold its cores), or
    None. A copy test on a machine with a 1-minute load average above its CPU count measured
    0.58 GB/s where the idle figure is 14 GB/s (this project's shared build VM)."""
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    return f"load average {load:.1f} on {cpus} CPUs" if load > cpus else None


def cached_bandwidth(
    facts: Any,
    measure: Callable[[float], float],
    *,
    environ: Mapping[str, str] | None = None,
    now: float | None = None,
    busy: Callable[[], str | None] = machine_busy,
) -> tuple[float, str]:
    """(GB/s, how it was obtained): the stored figure for this machine if fresh, else a new
    measurement with ``measure(MEASURE_SECONDS)``, stored atomically -- unless ``busy()``
    says other jobs hold the machine: that figure is used for this plan only, never stored."""
    path = edgepack_home(environ) / _FILE
    key = machine_key(facts)
    now = time.time() if now is None else now
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        entry = stored.get(key) if isinstance(stored, dict) else None
        if (isinstance(entry, dict) and isinstance(entry.get("gbps"), (int, float))
                and 0 <= now - float(entry.get("at", 0)) <= MAX_AGE_SECONDS):
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(entry["at"])))
            return float(entry["gbps"]), f"measured {when}, cached in {path}"
    except (OSError, ValueError, TypeError):
        stored = {}
    gbps = measure(MEASURE_SECONDS)
    why_busy = busy()
    if why_busy is not None:
        return gbps, (f"measured now ({MEASURE_SECONDS:g} s copy test) while busy "
                      f"({why_busy}): not cached, and likely below the idle figure")
    try:
        data = stored if isinstance(stored, dict) else {}
        data[key] = {"gbps": gbps, "at": now}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{_FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
    return gbps, f"measured now ({MEASURE_SECONDS:g} s copy test)"
