"""Prometheus metrics for one server, on a registry of its own (never the global one).

Process RSS, device temperature and the Raspberry Pi's throttling flags are read at scrape
time by a custom collector, so an idle server costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Raspberry Pi firmware's throttling bitmask (under-voltage, frequency capped, throttled,
# soft temperature limit; bits 16-19 record that each happened since boot).
# Source: https://www.raspberrypi.com/documentation/computers/os.html#get_throttled
PI_THROTTLED = Path("/sys/devices/platform/soc/soc:firmware/get_throttled")

# The request metrics' model label for a request that named no model, and for one that named
# a model this server does not serve. Empty is what PromQL reads as "no label"; the other is
# fixed too (a model served under that very id would share its series).
NO_MODEL = ""
UNKNOWN_MODEL = "(unknown)"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class _DeviceCollector(Collector):
    """RSS, temperatures and throttling, read when Prometheus scrapes."""

    def __init__(self, throttled_path: Path = PI_THROTTLED) -> None:
        self._throttled_path = throttled_path

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import psutil

        rss = GaugeMetricFamily("edgepack_process_resident_memory_bytes",
                                "Resident memory of the server process")
        rss.add_metric([], float(psutil.Process(os.getpid()).memory_info().rss))
        yield rss
        temps = GaugeMetricFamily("edgepack_device_temperature_celsius",
                                  "Temperature sensors the OS exposes", labels=["sensor"])
        try:
            readings = psutil.sensors_temperatures() if hasattr(
                psutil, "sensors_temperatures") else {}
        except OSError:
            readings = {}
        for chip, entries in readings.items():
            for i, entry in enumerate(entries):
                temps.add_metric([f"{chip}/{entry.label or i}"], float(entry.current))
        yield temps
        try:
            raw = self._throttled_path.read_text().strip()
        except OSError:
            return
        try:
            flags = int(raw.split("=")[-1], 16)
        except ValueError:
            return
        thr = GaugeMetricFamily("edgepack_device_throttled_flags",
                                "Raspberry Pi get_throttled bitmask (0 = never throttled)")
        thr.add_metric([], float(flags))
        yield thr


class ServerMetrics:
    """All the server's instruments, registered on ``self.registry``.

    Per-model instruments carry a ``model`` label whose values are the models this server
    loaded (a fixed set, so the label stays bounded); :meth:`for_model` hands one model's
    children to the code that serves it. HTTP requests and their duration are counted by route,
    status and model: the model a request was routed to (runtimes/models.py notes it), else
    :data:`NO_MODEL` for a request that named none (``/healthz``, ``/v1/models``, a body
    refused before its ``model`` was read) and :data:`UNKNOWN_MODEL` for one that named a model
    this server does not serve (404): never the client's string, so the label stays bounded.
    """

    def __init__(self, throttled_path: Path = PI_THROTTLED) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("edgepack_requests", "HTTP requests by route, status and model",
                                ["route", "status", "model"], registry=r)
        self.latency = Histogram("edgepack_request_duration_seconds",
                                 "Time from request to the end of the response",
                                 ["route", "model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ready = Gauge("edgepack_ready", "1 when /readyz answers 200 (every model ready)",
                           registry=r)
        m = ["model"]
        self.ttft = Histogram("edgepack_time_to_first_token_seconds",
                              "Time from request to the first generated text", m,
                              buckets=_TTFT_BUCKETS, registry=r)
        self.queue_wait = Histogram("edgepack_queue_wait_seconds",
                                    "Time a request waited for the engine", m,
                                    buckets=_TTFT_BUCKETS, registry=r)
        self.tokens_in = Counter("edgepack_prompt_tokens", "Prompt tokens read", m, registry=r)
        self.tokens_out = Counter("edgepack_completion_tokens", "Tokens generated", m,
                                  registry=r)
        self.decode_rate = Gauge("edgepack_decode_tokens_per_second",
                                 "Decode speed of the last finished generation", m, registry=r)
        self.generations = Counter("edgepack_generations",
                                   "Finished generations by finish reason", ["model", "reason"],
                                   registry=r)
        self.queue_depth = Gauge("edgepack_queue_depth",
                                 "Requests admitted and waiting for the engine", m, registry=r)
        self.running = Gauge("edgepack_running_requests", "Requests the engine is working on",
                             m, registry=r)
        self.rejected = Counter("edgepack_rejected_requests",
                                "Requests refused before reaching the engine",
                                ["model", "reason"], registry=r)
        self.model_ready = Gauge("edgepack_model_ready", "1 when this model is loaded and ready",
                                 m, registry=r)
        self.model = Info("edgepack_model", "A served model", m, registry=r)
        r.register(_DeviceCollector(throttled_path))

    def for_model(self, name: str) -> ModelMetrics:
        """The instruments of model ``name`` (children labelled with it)."""
        return ModelMetrics(self, name)


class _Labelled:
    """A labelled family with the model label filled in: ``.labels(reason)``."""

    def __init__(self, family: Counter, model: str) -> None:
        self._family = family
        self._model = model

    def labels(self, *rest: str) -> Counter:
        return self._family.labels(self._model, *rest)


class ModelMetrics:
    """One model's instruments, with the names the serving code uses."""

    def __init__(self, m: ServerMetrics, name: str) -> None:
        self.ttft = m.ttft.labels(name)
        self.queue_wait = m.queue_wait.labels(name)
        self.tokens_in = m.tokens_in.labels(name)
        self.tokens_out = m.tokens_out.labels(name)
        self.decode_rate = m.decode_rate.labels(name)
        self.queue_depth = m.queue_depth.labels(name)
        self.running = m.running.labels(name)
        self.ready = m.model_ready.labels(name)
        self.info = m.model.labels(name)
        self.generations = _Labelled(m.generations, name)
        self.rejected = _Labelled(m.rejected, name)
