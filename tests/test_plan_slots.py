"""The planner sizes parallel slots (server.toml n_parallel) and their KV cache.

Pure tests on model facts; then the real planner's output through the real bundle writer
(`edgepack build`) into the real server, which runs with the planned slots and checks the
planned memory (KV for every slot included) before loading.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import httpx
import pytest
from click.testing import CliRunner
from support.bundles import serve_bundle
from support.configs import CONFIGS, synth_tensors

from edgepack.device.resolve import load_profile
from edgepack.errors import BuildError, UsageError
from edgepack.plan.estimate import estimate_gguf
from edgepack.plan.facts import model_facts
from edgepack.plan.planner import PlanOptions, plan_build

NO_FLOOR = PlanOptions(min_tokens_per_second=0)


def facts(name: str):
    cfg = CONFIGS[name]
    return model_facts(cfg, synth_tensors(cfg))


def with_cores(profile, cores: int):
    return dataclasses.replace(profile, cpu=dataclasses.replace(profile.cpu, cores=cores))


def test_memory_holds_the_kv_cache_of_every_slot():
    profile = load_profile("raspberry-pi-5-8gb")  # 4 cores, room to spare for 135M
    plan = plan_build(facts("SmolLM2-135M"), profile, NO_FLOOR)
    one = estimate_gguf(facts("SmolLM2-135M"), profile, plan.quant, plan.ctx)
    assert plan.parallel == 4
    d = plan.to_dict()
    assert d["parallel"] == 4
    assert d["memory"]["kv_cache_slots"] == 4
    assert d["memory"]["kv_cache_bytes"] == 4 * one.kv_bytes
    assert d["memory"]["output_buffer_bytes"] == 4 * one.output_bytes
    # llama.cpp's compute buffer does not grow with the slots (plan/slots.py's measurement)
    assert d["memory"]["compute_buffer_bytes"] == one.compute_bytes
    assert d["memory"]["required_bytes"] == one.required_bytes + 3 * (one.kv_bytes
                                                                      + one.output_bytes)
    assert any(r.startswith("4 parallel slot(s): one per core") for r in plan.rationale)


def test_slots_follow_the_cores_and_the_memory_left():
    pi = load_profile("raspberry-pi-5-8gb")
    assert plan_build(facts("SmolLM2-135M"), with_cores(pi, 2), NO_FLOOR).parallel == 2
    # Llama-2-7B (no GQA: 2 GiB of KV at ctx 4096) on 16 GB: Q8_0 keeps its quality and
    # only one slot's KV fits beside it; asking for two is refused, naming what fits.
    laptop = load_profile("laptop-x86-16gb")
    plan = plan_build(facts("Llama-2-7B"), laptop, NO_FLOOR)
    assert (plan.quant, plan.ctx, plan.parallel) == ("Q8_0", 4096, 1)
    why = next(r for r in plan.rationale if "parallel slot" in r)
    assert "memory left after the weights" in why and "4 would need" in why
    with pytest.raises(BuildError) as e:
        plan_build(facts("Llama-2-7B"), laptop,
                   dataclasses.replace(NO_FLOOR, parallel=2))
    assert e.value.exit_code == 5
    assert "--parallel 2 does not fit laptop-x86-16gb" in e.value.message
    assert "at most 1 slot(s) fit at ctx 4096" in e.value.hint


def test_parallel_overrides_within_memory_and_is_refused_where_it_means_nothing():
    pi = load_profile("raspberry-pi-5-8gb")
    plan = plan_build(facts("SmolLM2-135M"), pi, dataclasses.replace(NO_FLOOR, parallel=6))
    assert plan.parallel == 6  # more than the default cap, as asked, because it fits
    assert any("6 parallel slot(s) as asked with --parallel" in r for r in plan.rationale)
    onnx = dataclasses.replace(NO_FLOOR, format="onnx", parallel=2)
    with pytest.raises(UsageError) as e:
        plan_build(facts("SmolLM2-135M"), pi, onnx)
    assert "--parallel 2" in e.value.message and e.value.exit_code == 2


def test_plan_command_shows_the_slots_and_why(smollm2_dir):
    from edgepack.cli.main import cli

    r = CliRunner().invoke(cli, ["plan", str(smollm2_dir), "--device", "raspberry-pi-5-8gb",
                                 "--parallel", "3", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["parallel"] == 3 and d["memory"]["kv_cache_slots"] == 3
    r = CliRunner().invoke(cli, ["plan", str(smollm2_dir), "--device", "raspberry-pi-4-4gb",
                                 "--parallel", "500"])
    assert r.exit_code == 5
    assert "--parallel 500 does not fit" in r.output


@pytest.mark.slow
def test_built_bundle_serves_with_the_planned_slots_and_memory(smollm2_dir, tmp_path):
    """`edgepack build` writes the plan's slots into server.toml and its memory (all slots'
    KV) into the manifest; the server runs with those slots and checks that memory."""
    from edgepack.cli.main import cli

    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["build", str(smollm2_dir), "--name", "smollm2-135m-instruct",
                                 "--device", "raspberry-pi-5-8gb",
                                 "--quant", "Q8_0", "--ctx", "1024", "--parallel", "3",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    (bundle,) = out.iterdir()
    plan = json.loads((bundle / "manifest.json").read_text())["plan"]
    assert plan["parallel"] == 3 and plan["memory"]["kv_cache_slots"] == 3
    assert "n_parallel = 3" in (bundle / "server.toml").read_text()
    need = plan["memory"]["required_bytes"]

    p = subprocess.run([sys.executable, "-m", "edgepack", "serve", str(bundle), "--port", "0",
                        "--memory-budget-bytes", str(need - 1)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 7, p.stderr
    assert f"{need / 2**20:,.0f} MiB" in p.stderr and "planned" in p.stderr

    server = serve_bundle(bundle, "--memory-budget-bytes", str(need))
    try:
        ready = httpx.get(server.base_url + "/readyz").json()
        assert ready["config"]["n_parallel"] == 3
        assert ready["n_ctx"] == 1024
        body = {"model": "smollm2-135m-instruct", "prompt": "1, 2, 3,", "max_tokens": 4,
                "temperature": 0}
        assert httpx.post(server.base_url + "/v1/completions", json=body,
                          timeout=120).status_code == 200
    finally:
        assert server.stop() == 0
