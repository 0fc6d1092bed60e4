"""Fleet convergence over MQTT, for ``bench/ota.py --fleet N``.

N agents (threads, one state dir each, the tests' stand-in health gate) update from one nginx
while reporting to one real Mosquitto on 127.0.0.1. Round 0 is a fresh install of the shipped
SmolLM2 Q4_1 bundle; then ``rounds`` pairs of config-only updates alternate reporting on and
off (the same devices, one version per round), so the cost of reporting shows side by side.

Per round: "agents done" is publish -> every agent's cycle returned; "converged (broker)" is
publish -> a subscriber on ``edgepack/<fleet>/#`` holds a state message with the new version
for every device (what `edgepack fleet status` would show); "messages/s" is what that
subscriber received in the window, divided by its length.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

FLEET = "bench"


class Subscriber:
    """Counts every message of the fleet and tracks each device's reported version."""

    def __init__(self, url: str) -> None:
        from edgepack.ota.agent.broker import close_client, make_client, parse_broker

        self._close = close_client
        cfg = parse_broker(url, fleet=FLEET)
        self.lock = threading.Lock()
        self.stamps: list[float] = []
        self.version: dict[str, Any] = {}
        self.client = make_client(cfg, "bench-subscriber")
        self.client.on_message = self._on_message
        self.client.connect(cfg.host, cfg.port, 30)
        self.client.subscribe(f"edgepack/{FLEET}/#", qos=1)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        now = time.monotonic()
        parts = msg.topic.split("/")
        with self.lock:
            self.stamps.append(now)
            if parts[-1] == "state" and msg.payload:
                self.version[parts[2]] = json.loads(msg.payload).get("installed")

    def all_on(self, version, n: int) -> bool:
        with self.lock:
            return sum(v == version for v in self.version.values()) >= n

    def count(self, t0: float, t1: float) -> int:
        with self.lock:
            return sum(t0 <= t <= t1 for t in self.stamps)

    def close(self) -> None:
        self._close(self.client)


def run_fleet(tmp: Path, repo, nginx_url: str, n: int, rounds: int, gguf: Path) -> dict:
    from support.mqtt import Broker, _free_port
    from support.ota import STANDIN, make_bundle

    from edgepack.ota.agent.broker import parse_broker
    from edgepack.ota.agent.config import AgentConfig
    from edgepack.ota.agent.health import SubprocessLauncher
    from edgepack.ota.agent.report import MqttReporter, device_status
    from edgepack.ota.agent.state import StateDir
    from edgepack.ota.agent.updater import Agent

    broker = Broker(tmp / "mosquitto", _free_port()).start()
    sub = Subscriber(broker.url)
    cfg = parse_broker(broker.url, fleet=FLEET)
    reporters, with_mqtt, without = [], [], []
    for i in range(n):
        s = StateDir(tmp / "fleet" / f"d{i}")
        s.init(repo.root_json().read_bytes(), f"fleet-{i}")
        rep = MqttReporter(cfg, f"fleet-{i}",
                           lambda s=s, i=i: device_status(s, f"fleet-{i}")).start()
        reporters.append(rep)
        config = AgentConfig(nginx_url, "stable", deadline=900, health_window=300)
        with_mqtt.append(Agent(s, config, launcher=SubprocessLauncher(STANDIN), reporter=rep))
        without.append(Agent(s, config, launcher=SubprocessLauncher(STANDIN)))
    version = max(repo.channel_versions("stable"))
    rows = []
    try:
        for r in range(2 * rounds + 1):
            mqtt = r == 0 or r % 2 == 1
            if r:
                version += 1
                repo.publish(make_bundle(tmp / f"fleet-b{version}", version, gguf,
                                         server={"engine": {"ctx": 512 + version}}), "stable")
            agents = with_mqtt if mqtt else without
            t0 = time.monotonic()
            with ThreadPoolExecutor(n) as pool:
                results = list(pool.map(lambda a: a.run_once().result, agents))
            done = time.monotonic() - t0
            converged = None
            if mqtt:
                end = time.monotonic() + 120
                while not sub.all_on(version, n) and time.monotonic() < end:
                    time.sleep(0.02)
                if sub.all_on(version, n):
                    converged = time.monotonic() - t0
            t1 = t0 + (converged or done)
            msgs = sub.count(t0, t1)
            rows.append({"round": r, "kind": "fresh install" if r == 0 else "config-only",
                         "mqtt": mqtt, "version": version,
                         "installed": results.count("installed"), "agents_done_s": done,
                         "converged_s": converged, "messages": msgs,
                         "messages_per_s": msgs / max(t1 - t0, 1e-9) if mqtt else None})
            print(rows[-1], flush=True)
    finally:
        for rep in reporters:
            rep.close()
        sub.close()
        broker.stop()
    return {"n": n, "rounds": rows}


def summary(result: dict) -> list[str]:
    """Markdown lines: per-round table, then medians with spread."""
    rows = result["rounds"]
    lines = ["| round | update | reporting | installed | agents done s | converged (broker) s "
             "| messages | messages/s |", "|---:|---|---|---:|---:|---:|---:|---:|"]

    def f(x, fmt="{:.1f}"):
        return "" if x is None else fmt.format(x)

    for r in rows:
        lines.append(f"| {r['round']} | {r['kind']} | {'on' if r['mqtt'] else 'off'} | "
                     f"{r['installed']}/{result['n']} | {f(r['agents_done_s'])} | "
                     f"{f(r['converged_s'])} | {r['messages']} | "
                     f"{f(r['messages_per_s'], '{:.0f}')} |")

    def med(values):
        values = [v for v in values if v is not None]
        if not values:
            return "n/a"
        return (f"{statistics.median(values):.1f} (min {min(values):.1f}, max "
                f"{max(values):.1f}, n={len(values)})")

    upd = [r for r in rows if r["round"] > 0]
    on = [r for r in upd if r["mqtt"]]
    off = [r for r in upd if not r["mqtt"]]
    lines += ["", f"Config-only updates, median (spread) over alternating rounds, {result['n']} "
              "agents:", "",
              f"- agents done, reporting on: {med([r['agents_done_s'] for r in on])} s",
              f"- agents done, reporting off: {med([r['agents_done_s'] for r in off])} s",
              f"- converged as the broker sees it: {med([r['converged_s'] for r in on])} s",
              f"- broker messages/s in that window: {med([r['messages_per_s'] for r in on])}",
              f"- messages per device per update: "
              f"{med([r['messages'] / result['n'] for r in on])}", "",
              "messages/s is the load the fleet put on the broker while converging, not the "
              "broker's capacity; the rounds' time goes to hashing 98 MB slots and starting "
              "one stand-in server per agent on 2 shared cores, not to MQTT."]
    return lines
