"""llama.cpp's measured decode compute rate: the probe (real llama.cpp on a synthetic GGUF), its
cache, the profile fields, and the estimate and plan that use it."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
from click.testing import CliRunner
from support.configs import CONFIGS, synth_tensors

from edgepack.cli.main import cli
from edgepack.device.catalog import load_profile_ref
from edgepack.device.compute_probe import (
    CHUNKS,
    PROBE_SHAPE,
    PROMPT_TOKENS,
    DecodeRate,
    Rate,
    contended,
    decode_rate,
    measure_decode_gflops,
    probe_params,
    write_probe_gguf,
)
from edgepack.device.detect import build_profile, gather_host_facts
from edgepack.device.measure_cache import MAX_AGE_SECONDS, cached_compute
from edgepack.device.profile import (
    decode_gflops_at,
    decode_range_at,
    effective_bandwidth_gbps,
    profile_to_toml,
    with_threads,
)
from edgepack.device.validation import parse_profile_dict
from edgepack.errors import ProfileError
from edgepack.plan.estimate import (
    ETA_DECODE,
    TAU_CPU,
    decode_compute_gflops,
    estimate_gguf,
    prompt_compute_gflops,
)
from edgepack.plan.facts import model_facts
from edgepack.plan.planner import PlanOptions, plan_build

STAMP = "test"
ORDER = "[slowest, fastest]"


def _measured(profile, all_cores: float | None, one: float | None, how: str = "measured now",
              spread: tuple | None = None, spread_1t: tuple | None = None, **prompt):
    """``profile`` with measured decode rates (and chunk spreads, and ``prompt``: the
    ``measured_prompt_gflops*`` fields), sourced as detect writes them."""
    sources = dict(profile.sources)
    fields = {"measured_decode_gflops": all_cores, "measured_decode_gflops_1t": one,
              "measured_decode_gflops_range": spread,
              "measured_decode_gflops_1t_range": spread_1t,
              **{f"measured_prompt_gflops{k}": v for k, v in prompt.items()}}
    cpu = dataclasses.replace(profile.cpu, **fields)
    for key, value in fields.items():
        if value is not None:
            sources[f"cpu.{key}"] = how
    return dataclasses.replace(profile, cpu=cpu, sources=sources)


def test_the_probe_gguf_loads_in_llama_cpp_with_the_parameters_it_counts(tmp_path):
    import gguf
    import llama_cpp

    path = tmp_path / "probe.gguf"
    params = write_probe_gguf(path)
    hidden, layers, vocab = PROBE_SHAPE[0], PROBE_SHAPE[1], PROBE_SHAPE[-1]
    reader = gguf.GGUFReader(str(path))
    matrices = [t for t in reader.tensors if len(t.shape) == 2]
    assert {t.tensor_type for t in matrices} == {gguf.GGMLQuantizationType.Q8_0}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False)
    try:
        # llama.cpp also counts the embedding table and the norm vectors; the probe counts
        # the matrices a token multiplies
        norms = (2 * layers + 1) * hidden
        assert params == probe_params()
        assert llm._model.n_params() == params + vocab * hidden + norms
        llm.eval([1, 5, 6])
        assert llm.n_tokens == 3
    finally:
        llm.close()


def test_the_probe_measures_a_positive_rate_per_thread_count_here():
    facts = gather_host_facts()
    rates, how = measure_decode_gflops((1, facts.physical_cores))
    assert rates is not None, how
    assert set(rates) == {1, facts.physical_cores}
    for r in rates.values():  # the median chunk, inside its slowest..fastest spread
        assert r.low is not None and r.high is not None
        assert 0 < r.low <= r.gflops <= r.high
        # and the median prompt batch, inside its spread
        assert r.prompt is not None and r.prompt.spread is not None, r
        assert 0 < r.prompt.low <= r.prompt.gflops <= r.prompt.high
    assert how.startswith("measured now with llama-cpp-python")
    profile = build_profile(facts, measured_compute=rates, compute_how=how)
    at_cores = rates[facts.physical_cores]
    assert decode_gflops_at(profile.cpu, profile.cpu.cores) == at_cores.gflops
    assert profile.cpu.measured_decode_gflops_range == (at_cores.low, at_cores.high)
    assert "slowest and fastest chunk" in profile.sources["cpu.measured_decode_gflops_range"]
    assert f"median of {CHUNKS} x" in profile.sources["cpu.measured_decode_gflops"]
    assert profile.cpu.measured_prompt_gflops == at_cores.prompt.gflops
    assert profile.cpu.measured_prompt_gflops_range == at_cores.prompt.spread
    assert f"batches of {PROMPT_TOKENS} tokens" in profile.sources["cpu.measured_prompt_gflops"]
    assert "slowest and fastest batch" in profile.sources["cpu.measured_prompt_gflops_range"]
    # what detect writes, the profile parser reads back
    assert parse_profile_dict(json.loads(json.dumps(profile.to_dict()))) == profile


def test_the_figure_is_the_median_chunk_and_the_spread_its_extremes():
    params = 500_000_000  # 1 GFLOP per token: GFLOPS = tok/s
    rate = decode_rate([40.0, 52.0, 50.0, 10.0, 49.0], params)  # one chunk hit by another job
    assert rate == DecodeRate(49.0, 10.0, 52.0) and rate.spread == (10.0, 52.0)
    assert decode_rate([30.0, 50.0], params).gflops == 40.0


def test_without_the_gguf_runtime_the_measurement_is_absent_with_a_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    rates, how = measure_decode_gflops((1, 2))
    assert rates is None
    assert how.startswith("not measured: the GGUF runtime is not importable here")
    profile = build_profile(gather_host_facts(), measured_compute=rates, compute_how=how)
    assert profile.cpu.measured_decode_gflops is None
    assert profile.cpu.measured_decode_gflops_1t is None
    assert profile.sources["cpu.measured_decode_gflops"].startswith("not measured")
    assert "nominal" in decode_compute_gflops(profile)[1]


def test_compute_cache_measures_once_per_machine_and_never_stores_a_busy_or_absent_figure(
    tmp_path,
):
    env = {"EDGEPACK_HOME": str(tmp_path)}
    facts = gather_host_facts()
    calls: list[int] = []
    result: dict[str, object] = {"rates": None}

    def measure():  # counts calls; the real probe is tested above
        calls.append(1)
        rates = result["rates"] or {1: _rate(10.0 + len(calls)), 2: _rate(20.0 + len(calls))}
        return rates, "measured now with llama-cpp-python x (1.0 s)"

    def compute(f, now, busy=None):
        return cached_compute(f, measure, environ=env, now=now, busy=lambda: busy)

    def gflops(rates):
        return {n: r.gflops for n, r in rates.items()}

    assert compute(facts, 1000.0) == ({1: _rate(11.0), 2: _rate(21.0)},
                                      "measured now with llama-cpp-python x (1.0 s)")
    rates, how = compute(facts, 2000.0)
    assert (rates, len(calls)) == ({1: _rate(11.0), 2: _rate(21.0)}, 1) and "cached in" in how
    stored = json.loads((tmp_path / "compute.json").read_text())
    assert list(stored.values())[0]["value"] == {
        "1": {"gflops": 11.0, "low": 10.0, "high": 12.0,
              "prompt": {"gflops": 33.0, "low": 32.0, "high": 34.0}},
        "2": {"gflops": 21.0, "low": 20.0, "high": 22.0,
              "prompt": {"gflops": 63.0, "low": 62.0, "high": 64.0}}}
    assert gflops(compute(facts, 1001.0 + MAX_AGE_SECONDS)[0]) == {1: 12.0, 2: 22.0}  # expired
    other = dataclasses.replace(facts, physical_cores=facts.physical_cores + 8)
    assert gflops(compute(other, 2000.0 + MAX_AGE_SECONDS)[0]) == {1: 13.0, 2: 23.0}
    assert len(calls) == 3
    # measured while other jobs hold the CPUs: used once, not stored
    value, how = compute(facts, 10 * MAX_AGE_SECONDS, busy="load average 9.0 on 2 CPUs")
    assert gflops(value) == {1: 14.0, 2: 24.0}
    assert "while busy (load average 9.0 on 2 CPUs): not cached" in how
    assert gflops(compute(facts, 10 * MAX_AGE_SECONDS)[0]) == {1: 15.0, 2: 25.0}
    # an unusable stored entry is measured again: a bad number, a spread that misses its figure
    for bad in ({"1": -3}, {"1": {"gflops": 9.0, "low": 10.0, "high": 12.0}},
                {"1": {"gflops": 11.0, "low": 10.0, "high": 12.0, "prompt": {"gflops": 1}}}):
        stored = json.loads((tmp_path / "compute.json").read_text())
        for entry in stored.values():
            entry["value"] = bad
        (tmp_path / "compute.json").write_text(json.dumps(stored))
        before = len(calls)
        compute(facts, 10 * MAX_AGE_SECONDS)
        assert len(calls) == before + 1
    # a cache written before the spread was kept (bare numbers) still loads, without one
    stored = json.loads((tmp_path / "compute.json").read_text())
    for entry in stored.values():
        entry["value"] = {"1": 9.5, "2": 17.25}
    (tmp_path / "compute.json").write_text(json.dumps(stored))
    before = len(calls)
    rates, how = compute(facts, 10 * MAX_AGE_SECONDS)
    assert rates == {1: DecodeRate(9.5), 2: DecodeRate(17.25)} and "cached in" in how
    assert len(calls) == before
    profile = build_profile(facts, measured_compute=rates, compute_how=how)
    assert profile.cpu.measured_decode_gflops_1t in (9.5, None)
    assert profile.cpu.measured_decode_gflops_range is None
    assert not any(k.endswith("_range") for k in profile.sources)
    assert profile.cpu.measured_prompt_gflops is None
    # one written before the prompt was timed (a decode spread, no prompt) loads without it
    stored = json.loads((tmp_path / "compute.json").read_text())
    for entry in stored.values():
        entry["value"] = {"1": {"gflops": 9.5, "low": 9.0, "high": 10.0}}
    (tmp_path / "compute.json").write_text(json.dumps(stored))
    assert compute(facts, 10 * MAX_AGE_SECONDS)[0] == {1: DecodeRate(9.5, 9.0, 10.0)}
    assert len(calls) == before


def test_all_cores_slower_than_one_is_contention_and_is_not_cached(tmp_path, monkeypatch):
    """At load 1.9 on this 2-vCPU VM (below the busy rule's CPU count) the 2-thread figure
    read 0.19 GFLOPS where 1 thread read 8.7: a figure like that is used once, never stored."""
    env = {"EDGEPACK_HOME": str(tmp_path)}
    facts = gather_host_facts()
    collapsed = {1: DecodeRate(8.7, 8.1, 9.2), 2: DecodeRate(0.19, 0.18, 0.2)}
    assert contended({1: DecodeRate(8.7), 2: DecodeRate(15.9)}) is None
    assert contended({1: DecodeRate(8.7)}) is None
    why = contended(collapsed)
    assert why == ("2 threads decoded at 0.19 GFLOPS, below 1 thread's 8.7: other work shares "
                   "the cores")
    rates, how = cached_compute(facts, lambda: (collapsed, "measured now"), environ=env,
                                now=1000.0, busy=lambda: None)
    assert rates == collapsed and f"while busy ({why}): not cached" in how
    assert not (tmp_path / "compute.json").exists()
    # detect_profile says so in the figure's source, and the plan then warns (as for load)
    import edgepack.device.detect as detect

    monkeypatch.setattr(detect, "measure_decode_gflops",
                        lambda threads: (collapsed, "measured now"))
    profile = detect.detect_profile(measure=True, seconds=0.05, busy=lambda: None)
    assert f"while busy ({why})" in profile.sources["cpu.measured_decode_gflops"]


def _rate(gflops: float) -> DecodeRate:
    return DecodeRate(gflops, gflops - 1.0, gflops + 1.0,
                      Rate(3 * gflops, 3 * gflops - 1.0, 3 * gflops + 1.0))


def test_an_absent_measurement_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    env = {"EDGEPACK_HOME": str(tmp_path)}
    rates, how = cached_compute(gather_host_facts(), lambda: measure_decode_gflops((1,)),
                                environ=env)
    assert rates is None and how.startswith("not measured")
    assert not (tmp_path / "compute.json").exists()


def test_measured_fields_round_trip_through_toml_and_json(tmp_path):
    base = load_profile_ref("laptop-x86-16gb")
    p = _measured(base, 41.5, 12.25, "llama.cpp Q8_0 decode of a synthetic model; test",
                  (38.0, 44.25), (11.0, 13.5), **{"": 120.0, "_1t": 35.5,
                                                 "_range": (110.0, 121.0),
                                                 "_1t_range": (35.0, 36.0)})
    assert "measured_prompt_gflops_1t_range = [35.0, 36.0]" in profile_to_toml(p)
    assert "measured_decode_gflops_range = [38.0, 44.25]" in profile_to_toml(p)
    path = tmp_path / "laptop-x86-16gb.toml"
    path.write_text(profile_to_toml(p))
    loaded = load_profile_ref(str(path))
    assert loaded == p and loaded.sources == p.sources
    assert (loaded.cpu.measured_decode_gflops, loaded.cpu.measured_decode_gflops_1t) == (
        41.5, 12.25)
    assert loaded.cpu.measured_decode_gflops_1t_range == (11.0, 13.5)
    assert parse_profile_dict(json.loads(json.dumps(p.to_dict()))) == p
    # a profile written before the range was kept loads without one
    old = _measured(base, 41.5, 12.25, "test")
    assert "_range" not in profile_to_toml(old)
    assert parse_profile_dict(old.to_dict()).cpu.measured_decode_gflops_range is None


@pytest.mark.parametrize(
    ("key", "bad", "expected"),
    [
        ("measured_decode_gflops", -4.0, "a finite number > 0"),
        ("measured_decode_gflops_1t", 0, "a finite number > 0"),
        ("measured_decode_gflops", "fast", "a number"),
        ("measured_decode_gflops_1t", True, "a number"),
        ("measured_decode_gflops_range", 40.0, "a list of two numbers [slowest, fastest]"),
        ("measured_decode_gflops_range", [40.0], "a list of two numbers [slowest, fastest]"),
        ("measured_decode_gflops_range", [40.0, "x"], "a list of two numbers"),
        ("measured_decode_gflops_range", [44.0, 40.0], f"{ORDER} with 0 < slowest <= fastest"),
        ("measured_decode_gflops_range", [0, 44.0], f"{ORDER} with 0 < slowest <= fastest"),
        ("measured_decode_gflops_range", [42.0, 44.0],
         "a range around cpu.measured_decode_gflops = 41.5"),
        ("measured_decode_gflops_1t_range", [1.0, 2.0],
         "a range around cpu.measured_decode_gflops_1t = 12.25"),
        ("measured_prompt_gflops", 0, "a finite number > 0"),
        ("measured_prompt_gflops_range", [1.0, 2.0],
         "a range around cpu.measured_prompt_gflops = 120"),
    ],
)
def test_bad_measured_compute_is_named_with_value_and_expectation(key, bad, expected):
    data = _measured(load_profile_ref("laptop-x86-16gb"), 41.5, 12.25, "test", (40.0, 43.0),
                     (12.0, 13.0), **{"": 120.0, "_range": (110.0, 121.0)}).to_dict()
    data["cpu"][key] = bad
    with pytest.raises(ProfileError) as e:
        parse_profile_dict(data, origin="lab.toml")
    msg = str(e.value)
    assert f"field 'cpu.{key}' is {bad!r}; expected {expected}" in msg and "lab.toml" in msg


def test_measured_compute_needs_a_source():
    data = _measured(load_profile_ref("laptop-x86-16gb"), 41.5, None).to_dict()
    del data["sources"]["cpu.measured_decode_gflops"]
    with pytest.raises(ProfileError, match="sources.cpu.measured_decode_gflops"):
        parse_profile_dict(data)
    data = _measured(load_profile_ref("laptop-x86-16gb"), 41.5, None, "t", (40.0, 43.0)).to_dict()
    del data["sources"]["cpu.measured_decode_gflops_range"]
    with pytest.raises(ProfileError, match="sources.cpu.measured_decode_gflops_range"):
        parse_profile_dict(data)


def test_a_range_needs_its_figure():
    data = _measured(load_profile_ref("laptop-x86-16gb"), 41.5, None, "t", (40.0, 43.0)).to_dict()
    del data["cpu"]["measured_decode_gflops"]
    del data["sources"]["cpu.measured_decode_gflops"]
    with pytest.raises(ProfileError) as e:
        parse_profile_dict(data)
    assert "no range without its figure: add cpu.measured_decode_gflops" in str(e.value)


def test_shipped_profiles_carry_no_measured_compute():
    from edgepack.device.catalog import list_profiles

    for p in list_profiles():
        assert p.cpu.measured_decode_gflops is None and p.cpu.measured_decode_gflops_1t is None


def test_thread_scaling_prefers_measured_figures_over_proportional_scaling():
    base = load_profile_ref("laptop-x86-16gb")  # 8 cores
    assert base.cpu.cores == 8
    both = _measured(base, 50.0, 10.0)
    assert decode_gflops_at(both.cpu, 8) == 50.0 and decode_gflops_at(both.cpu, 1) == 10.0
    assert decode_gflops_at(both.cpu, 16) == 50.0  # no more than the cores' figure
    assert decode_gflops_at(both.cpu, 4) == pytest.approx(10.0 + 40.0 * 3 / 7)
    only_all = _measured(base, 48.0, None)
    assert decode_gflops_at(only_all.cpu, 2) == 12.0  # proportional from the one figure
    one = with_threads(both, 1)
    assert (one.cpu.cores, one.cpu.measured_decode_gflops) == (1, 10.0)
    assert one.cpu.peak_gflops_fp32 == pytest.approx(base.cpu.peak_gflops_fp32 / 8)
    assert decode_gflops_at(one.cpu, one.cpu.cores) == 10.0
    assert with_threads(base, 2).cpu.measured_decode_gflops is None
    # the spread follows the same rules; one measurement without a spread gives none
    ranged = _measured(base, 50.0, 10.0, "t", (46.0, 54.0), (9.0, 11.0))
    assert decode_range_at(ranged.cpu, 8) == (46.0, 54.0)
    assert decode_range_at(ranged.cpu, 1) == (9.0, 11.0)
    assert decode_range_at(ranged.cpu, 4) == (
        pytest.approx(9.0 + 37.0 * 3 / 7, abs=0.01), pytest.approx(11.0 + 43.0 * 3 / 7, abs=0.01))
    assert with_threads(ranged, 1).cpu.measured_decode_gflops_range == (9.0, 11.0)
    assert decode_range_at(_measured(base, 50.0, 10.0, "t", (46.0, 54.0)).cpu, 4) is None
    assert decode_range_at(base.cpu, 8) is None
    with pytest.raises(ValueError):
        with_threads(base, 9)


def _smollm_facts():
    cfg = CONFIGS["SmolLM2-135M"]
    return model_facts(cfg, synth_tensors(cfg))


def test_the_estimate_uses_the_measured_rate_in_the_direction_expected():
    facts = _smollm_facts()
    base = load_profile_ref("laptop-x86-16gb")
    nominal = estimate_gguf(facts, base, "Q8_0", 512).decode_tps
    nominal_rate = decode_compute_gflops(base)[0]
    slow = estimate_gguf(facts, _measured(base, nominal_rate / 4, None), "Q8_0", 512).decode_tps
    fast = estimate_gguf(facts, _measured(base, nominal_rate * 4, None), "Q8_0", 512).decode_tps
    assert slow is not None and nominal is not None and fast is not None
    assert slow < nominal <= fast
    # at 4 x the rate the memory bound takes over: no faster than streaming the weights
    est = estimate_gguf(facts, base, "Q8_0", 512)
    assert 1 / fast - facts.n_layer * TAU_CPU == pytest.approx(
        est.bytes_per_token / (ETA_DECODE * effective_bandwidth_gbps(base) * 1e9))
    # at a quarter of the rate the step is compute-bound: 2 x params / the measured rate
    step = 1 / slow - facts.n_layer * TAU_CPU
    assert step == pytest.approx(2 * facts.n_params / (nominal_rate / 4 * 1e9))
    # a repacked Q4_0 (AVX2) gets the measured Q8_0 rate x ETA_COMPUTE_REPACK / ETA_COMPUTE_DOT
    measured = _measured(base, 20.0, None)
    rate, basis = decode_compute_gflops(measured, repacked=True)
    assert rate == pytest.approx(20.0 * 0.39 / 0.23)
    assert basis.startswith("measured: llama.cpp Q8_0 decode 20 GFLOPS at 8 threads")
    assert "repacked" in basis


def test_the_prompt_estimate_uses_the_measured_prompt_rate():
    facts = _smollm_facts()
    base = load_profile_ref("laptop-x86-16gb")
    flops = 2 * facts.n_params  # SmolLM2 ties its embeddings
    nominal = estimate_gguf(facts, base, "Q8_0", 512).prompt_tps
    assert nominal == pytest.approx(0.35 * base.cpu.peak_gflops_fp32 * 1e9 / flops)
    p = _measured(base, 20.0, None, "t", **{"": 90.0, "_range": (80.0, 95.5)})
    assert estimate_gguf(facts, p, "Q8_0", 512).prompt_tps == pytest.approx(90.0e9 / flops)
    rate, basis = prompt_compute_gflops(p)
    assert (rate, basis) == (90.0, "measured: llama.cpp Q8_0 prompt 90 GFLOPS at 8 threads, "
                                   "batches 80-95.5")
    # a repacked Q4_0 (AVX2) gets the measured Q8_0 rate x ETA_PROMPT_REPACK / ETA_PROMPT
    assert prompt_compute_gflops(p, repacked=True)[0] == pytest.approx(90.0 * 0.50 / 0.35)
    assert prompt_compute_gflops(base)[1].startswith("nominal: 0.35 x ")
    # the thread count the plan uses: 1 thread gets the 1-thread figure
    one = with_threads(_measured(base, 20.0, 4.0, "t", **{"": 90.0, "_1t": 14.0}), 1)
    assert prompt_compute_gflops(one)[0] == 14.0


def test_on_arm_with_dotprod_the_q8_0_probe_is_the_repacked_kernel():
    pi5 = _measured(load_profile_ref("raspberry-pi-5-8gb"), 8.0, 2.5)
    assert decode_compute_gflops(pi5, repacked=True)[0] == 8.0
    assert decode_compute_gflops(pi5, repacked=False)[0] == pytest.approx(8.0 * 0.23 / 0.39)


def test_the_plan_says_where_its_compute_figure_came_from():
    facts = _smollm_facts()
    base = load_profile_ref("laptop-x86-16gb")
    opts = PlanOptions(quant="Q8_0")
    nominal = plan_build(facts, base, opts).to_dict()
    assert nominal["device"]["compute_basis"].startswith("nominal: 0.23 x ")
    assert any("compute rate of" in r and "nominal" in r for r in nominal["rationale"])
    busy = "llama.cpp ...; measured now (1 s) while busy (load average 9.0 on 8 CPUs): not cached"
    plan = plan_build(facts, _measured(base, 20.0, 4.0, busy), opts).to_dict()
    assert plan["device"]["decode_gflops"] == 20.0
    assert plan["device"]["compute_basis"] == (
        "measured: llama.cpp Q8_0 decode 20 GFLOPS at 8 threads")
    assert plan["device"]["measured_decode_gflops_range"] is None  # measured without a spread
    assert any("compute rate of 20 GFLOPS (measured" in r for r in plan["rationale"])
    assert any("decode compute rate was" in w and "idle" in w for w in plan["warnings"])
    assert plan["speed"]["decode_tokens_per_second"] != nominal["speed"][
        "decode_tokens_per_second"]
    ranged = plan_build(facts, _measured(base, 20.0, 4.0, "t", (18.5, 21.25), (3.5, 4.5)),
                        opts).to_dict()
    assert ranged["device"]["compute_basis"] == (
        "measured: llama.cpp Q8_0 decode 20 GFLOPS at 8 threads, chunks 18.5-21.25")
    assert ranged["device"]["measured_decode_gflops_range"] == [18.5, 21.25]
    assert ranged["device"]["prompt_basis"].startswith("nominal: 0.35 x ")  # not measured
    assert ranged["device"]["measured_prompt_gflops_range"] is None
    prompted = plan_build(facts, _measured(base, 20.0, 4.0, "t", **{"": 75.0, "_range": (
        70.0, 77.0)}), opts).to_dict()
    assert prompted["device"]["prompt_gflops"] == 75.0
    assert prompted["device"]["measured_prompt_gflops_range"] == [70.0, 77.0]
    assert any("prompt estimate from 75 GFLOPS (measured: llama.cpp Q8_0 prompt 75 GFLOPS at 8 "
               "threads, batches 70-77)" in r for r in prompted["rationale"])
    assert prompted["speed"]["prompt_tokens_per_second"] == pytest.approx(
        75.0e9 / (2 * facts.n_params), rel=1e-3)
    assert any("compute rate of 20 GFLOPS (measured: llama.cpp Q8_0 decode 20 GFLOPS at 8 "
               "threads, chunks 18.5-21.25)" in r for r in ranged["rationale"])
    one = plan_build(facts, with_threads(
        _measured(base, 20.0, 4.0, "t", (18.5, 21.25), (3.5, 4.5)), 1), opts).to_dict()
    assert one["device"]["compute_basis"] == (
        "measured: llama.cpp Q8_0 decode 4 GFLOPS at 1 thread, chunks 3.5-4.5")


def test_plan_cli_prints_the_compute_basis(tiny_llama_dir, tmp_path):
    p = _measured(load_profile_ref("laptop-x86-16gb"), 33.0, 7.0, "a measurement; test",
                  (30.0, 35.5), (6.5, 7.5))
    path = tmp_path / "lab.toml"
    path.write_text(profile_to_toml(dataclasses.replace(p, id="lab")))
    r = CliRunner().invoke(cli, ["plan", str(tiny_llama_dir), "--device", str(path)])
    assert r.exit_code == 0, r.output
    assert "compute rate of 33 GFLOPS" in " ".join(r.output.split())
    assert "chunks 30-35.5" in " ".join(r.output.split())
    r = CliRunner().invoke(cli, ["plan", str(tiny_llama_dir), "--device", str(path), "--json"])
    device = json.loads(r.output)["device"]
    assert device["compute_basis"].startswith("measured: llama.cpp")
    assert device["measured_decode_gflops_range"] == [30.0, 35.5]


def test_profiles_detect_measure_json_includes_the_measured_compute_and_its_source():
    r = CliRunner().invoke(cli, ["profiles", "detect", "--measure", "--measure-seconds", "0.3",
                                 "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    cores = data["cpu"]["cores"]
    assert data["cpu"]["measured_decode_gflops"] > 0
    source = data["sources"]["cpu.measured_decode_gflops"]
    assert source.startswith("llama.cpp Q8_0 decode of a synthetic")
    assert f"at {cores} thread(s); measured now" in source
    if cores > 1:
        assert data["cpu"]["measured_decode_gflops_1t"] > 0
        assert "at 1 thread(s)" in data["sources"]["cpu.measured_decode_gflops_1t"]
    assert data["derived"]["decode_gflops"] == data["cpu"]["measured_decode_gflops"]
    low, high = data["cpu"]["measured_decode_gflops_range"]
    assert low <= data["cpu"]["measured_decode_gflops"] <= high
    assert data["derived"]["decode_gflops_range"] == [low, high]
    assert "cpu.measured_decode_gflops_range" in data["sources"]
    low, high = data["cpu"]["measured_prompt_gflops_range"]
    assert 0 < low <= data["cpu"]["measured_prompt_gflops"] <= high
    assert data["derived"]["prompt_gflops"] == data["cpu"]["measured_prompt_gflops"]
    assert f"at {cores} thread(s)" in data["sources"]["cpu.measured_prompt_gflops"]
    if cores > 1:
        assert "at 1 thread(s)" in data["sources"]["cpu.measured_prompt_gflops_1t"]
    assert data["derived"]["compute_basis"].startswith("measured")


def test_a_rate_measured_on_a_busy_machine_says_so_and_the_plan_warns():
    from edgepack.device.detect import detect_profile

    profile = detect_profile(measure=True, seconds=0.2, busy=lambda: "load average 9.0 on 2 CPUs")
    source = profile.sources["cpu.measured_decode_gflops"]
    assert "while busy (load average 9.0 on 2 CPUs): likely below the idle figure" in source
    plan = plan_build(_smollm_facts(), profile, PlanOptions(quant="Q8_0"))
    assert any("decode compute rate was" in w and "plan again when the machine is idle" in w
               for w in plan.warnings)


def test_build_prints_the_plans_warnings(tmp_path, tiny_llama_dir):
    """The build log shows what ``plan`` would warn of: here a profile whose decode rate was
    measured while the machine was busy (as ``profiles detect --measure`` writes it)."""
    from edgepack.build.pipeline import BuildRequest, run_build
    from edgepack.device.detect import detect_profile

    busy = detect_profile(measure=True, seconds=0.2, busy=lambda: "load average 9.0 on 2 CPUs")
    path = tmp_path / f"{busy.id}.toml"
    path.write_text(profile_to_toml(busy))
    lines: list[str] = []
    req = BuildRequest(model=str(tiny_llama_dir), devices=(str(path),), fmt="gguf",
                       quant="Q8_0", out=tmp_path / "out", golden=(), min_agreement=0.5)
    run_build(req, log=lines.append)
    warned = [x for x in lines if x.startswith(f"plan warning ({busy.id}):")]
    assert any("plan again when the machine is idle" in x for x in warned), lines
