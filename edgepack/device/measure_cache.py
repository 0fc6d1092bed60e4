"""Cached measurements of this machine, for ``--device local``.

``plan``/``build --device local`` must not plan with placeholder figures (a 2-vCPU build VM
measured 14 GB/s where the placeholder said 12.8 x 0.6, and llama.cpp's Q8_0 decode reached 13 %
of the nominal FLOPS peak where the planner assumed 23 %), nor spend seconds measuring on every
call. :func:`cached` measures once and keeps the figure in ``$EDGEPACK_HOME/<kind>.json`` for
:data:`MAX_AGE_SECONDS`, keyed by what identifies the machine (host, CPU model, cores, RAM): a
changed machine measures again. Two figures use it: memory bandwidth
(:func:`cached_bandwidth`, ``bandwidth.json``, about 2 s) and llama.cpp's decode compute rate
(:func:`cached_compute`, ``compute.json``, a few seconds; see
:mod:`edgepack.device.compute_probe`). A measurement taken while other jobs hold the CPUs is
used once and not stored; one that could not be taken (no GGUF runtime) is not stored either.
A cache file that cannot be read or written is ignored (the figure is then measured each
time), never an error.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from edgepack.device.compute_probe import DecodeRate, Rate, contended
from edgepack.paths import edgepack_home

MAX_AGE_SECONDS = 7 * 24 * 3600
MEASURE_SECONDS = 2.0


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


def cached(
    facts: Any,
    kind: str,
    measure: Callable[[], tuple[Any, str]],
    valid: Callable[[Any], bool],
    *,
    environ: Mapping[str, str] | None = None,
    now: float | None = None,
    busy: Callable[[], str | None] = machine_busy,
) -> tuple[Any, str]:
    """(figure, how it was obtained) for measurement ``kind``: the stored figure for this
    machine if fresh and ``valid``, else ``measure()`` -> (figure or None, how), stored
    atomically in ``$EDGEPACK_HOME/<kind>.json`` -- unless the figure is None (not measurable
    here) or ``busy()`` says other jobs hold the machine: that figure is used once, never
    stored."""
    file = f"{kind}.json"
    path = edgepack_home(environ) / file
    key = machine_key(facts)
    now = time.time() if now is None else now
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        entry = stored.get(key) if isinstance(stored, dict) else None
        if (isinstance(entry, dict) and valid(entry.get("value"))
                and 0 <= now - float(entry.get("at", 0)) <= MAX_AGE_SECONDS):
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(entry["at"])))
            return entry["value"], f"measured {when}, cached in {path}"
    except (OSError, ValueError, TypeError):
        stored = {}
    value, how = measure()
    if value is None:
        return None, how
    why_busy = busy()
    if why_busy is not None:
        return value, (f"{how} while busy ({why_busy}): not cached, and likely below the "
                       "idle figure")
    try:
        data = stored if isinstance(stored, dict) else {}
        data[key] = {"value": value, "at": now}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{file}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass
    return value, how


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def cached_bandwidth(
    facts: Any,
    measure: Callable[[float], float],
    *,
    environ: Mapping[str, str] | None = None,
    now: float | None = None,
    busy: Callable[[], str | None] = machine_busy,
) -> tuple[float, str]:
    """(GB/s, how it was obtained): :func:`cached` over ``measure(MEASURE_SECONDS)``."""
    value, how = cached(
        facts, "bandwidth",
        lambda: (measure(MEASURE_SECONDS), f"measured now ({MEASURE_SECONDS:g} s copy test)"),
        _positive, environ=environ, now=now, busy=busy,
    )
    return float(value), how


def _spread_entry(v: Any) -> bool:
    return (isinstance(v, dict) and {"gflops", "low", "high"} <= set(v)
            and all(_positive(v[k]) for k in ("gflops", "low", "high"))
            and v["low"] <= v["gflops"] <= v["high"])


def _rate_entry(v: Any) -> bool:
    """A stored rate: {"gflops", "low", "high"} (the median chunk and the spread) with an
    optional "prompt" of the same shape, or a bare number (caches written before the spread
    was kept)."""
    if _positive(v):
        return True
    return (_spread_entry(v) and set(v) <= {"gflops", "low", "high", "prompt"}
            and ("prompt" not in v or (_spread_entry(v["prompt"]) and len(v["prompt"]) == 3)))


def _thread_rates(v: Any) -> bool:
    return (isinstance(v, dict) and bool(v) and all(k.isdigit() and int(k) > 0 for k in v)
            and all(_rate_entry(x) for x in v.values()))


def _stored(r: Rate) -> Any:
    return {"gflops": r.gflops, "low": r.low, "high": r.high} if r.spread is not None else r.gflops


def _loaded(v: Any) -> DecodeRate:
    if _positive(v):
        return DecodeRate(float(v))
    prompt = v.get("prompt")
    return DecodeRate(float(v["gflops"]), float(v["low"]), float(v["high"]),
                      None if prompt is None else Rate(float(prompt["gflops"]),
                                                       float(prompt["low"]),
                                                       float(prompt["high"])))


def cached_compute(
    facts: Any,
    measure: Callable[[], tuple[dict[int, DecodeRate] | None, str]],
    *,
    environ: Mapping[str, str] | None = None,
    now: float | None = None,
    busy: Callable[[], str | None] = machine_busy,
) -> tuple[dict[int, DecodeRate] | None, str]:
    """({threads: decode GFLOPS with its chunk spread and the prompt rate} or None, how it was
    obtained): :func:`cached` over ``measure()``
    (:func:`edgepack.device.compute_probe.measure_decode_gflops`). A rate cached without its
    spread or its prompt rate (older edgepack) loads without them."""

    measured: list[dict[int, DecodeRate]] = []

    def run() -> tuple[dict[str, Any] | None, str]:
        rates, how = measure()
        if rates is None:
            return None, how
        measured.append(rates)
        out: dict[str, Any] = {}
        for k, r in rates.items():
            entry = _stored(r)
            if r.prompt is not None and r.prompt.spread is not None and isinstance(entry, dict):
                entry["prompt"] = _stored(r.prompt)
            out[str(k)] = entry
        return out, how

    def busy_now() -> str | None:
        # the load average, or the figures themselves (all cores slower than one)
        return busy() or (contended(measured[-1]) if measured else None)

    value, how = cached(facts, "compute", run, _thread_rates, environ=environ, now=now,
                        busy=busy_now)
    if value is None:
        return None, how
    return {int(k): _loaded(v) for k, v in value.items()}, how
