"""systemd units rendered for a bundle; checked with systemd-analyze when it is installed."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from edgepack.runtimes.systemd import AGENT_UNIT, SERVER_UNIT, memory_max_bytes, render_units
from support.configs import CONFIGS, synth_tensors
from support.programs import require_program

from edgepack.build.pipeline import plan_systemd_units
from edgepack.device.resolve import load_profile
from edgepack.plan.facts import model_facts
from edgepack.plan.planner import PlanOptions, plan_build

MEMORY = 300 * 2**20


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def test_server_unit_is_notify_hardened_and_memory_bounded():
    d = _directives(render_units("/var/lib/edgepack/current", memory_bytes=MEMORY)[SERVER_UNIT])
    assert d["Type"] == ["notify"]
    assert d["Restart"] == ["on-failure"]
    assert int(d["WatchdogSec"][0]) > 0
    assert d["ExecStart"] == ["/usr/local/bin/edgepack serve /var/lib/edgepack/current "
                              "--host 127.0.0.1 --port 8080"]
    # 300 MiB * 1.1 + 256 MiB = 586 MiB
    assert d["MemoryMax"] == ["586M"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["ProtectSystem"] == ["strict"]
    assert "ReadWritePaths" not in d  # the server writes nothing
    assert d["User"] == ["edgepack"]
    assert d["PrivateDevices"] == ["yes"]


def test_gpu_plans_keep_device_nodes_and_no_plan_means_no_memory_max():
    d = _directives(render_units("/b", gpu_offload=True)[SERVER_UNIT])
    assert "PrivateDevices" not in d
    assert "MemoryMax" not in d
    assert memory_max_bytes(None) is None


def test_agent_unit_reads_its_source_from_an_environment_file():
    d = _directives(render_units("/var/lib/edgepack/current", memory_bytes=MEMORY)[AGENT_UNIT])
    assert d["EnvironmentFile"] == ["/etc/edgepack/agent.env"]
    assert "${EDGEPACK_REPO_URL}" in d["ExecStart"][0]
    assert "${EDGEPACK_CHANNEL}" in d["ExecStart"][0]
    assert d["ReadWritePaths"] == ["/var/lib/edgepack"]


def test_units_pass_systemd_analyze_verify(tmp_path):
    analyze = require_program("systemd-analyze")
    exe = shutil.which("edgepack") or "/bin/true"
    units = render_units("/var/lib/edgepack/current", memory_bytes=MEMORY, executable=exe)
    for name, text in units.items():
        (tmp_path / name).write_text(text)
    p = subprocess.run([analyze, "verify", "--man=no", SERVER_UNIT, AGENT_UNIT],
                       cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "Unknown key" not in p.stderr and "Unknown lvalue" not in p.stderr


@pytest.mark.parametrize("device", ["raspberry-pi-5-8gb", "jetson-orin-nano-8gb"])
def test_units_from_a_real_plan_carry_its_memory_and_offload(device):
    # The consumer fed by its producer: a plan from plan_build, through the build's own glue.
    cfg = CONFIGS["Qwen2.5-0.5B"]
    facts = model_facts(cfg, synth_tensors(cfg))
    plan = plan_build(facts, load_profile(device), PlanOptions())
    d = _directives(plan_systemd_units(plan)[SERVER_UNIT])
    assert d["MemoryMax"] == [f"{memory_max_bytes(plan.estimate.required_bytes) // 2**20}M"]
    assert plan.to_dict()["memory"]["required_bytes"] == plan.estimate.required_bytes
    assert ("PrivateDevices" in d) == (plan.gpu_layers == 0)
