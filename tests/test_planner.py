"""The planner as a pure function, and its GGUF size model against real llama.cpp output."""

from __future__ import annotations

import dataclasses

import pytest
from support.configs import CONFIGS, synth_tensors

from edgepack.device.catalog import list_profiles
from edgepack.device.resolve import load_profile
from edgepack.errors import BuildError, UsageError
from edgepack.plan.estimate import repack_types
from edgepack.plan.facts import model_facts
from edgepack.plan.planner import PlanOptions, plan_build, step_up_skip
from edgepack.plan.quants import FILE_TYPES_BY_NAME, higher_precision

MODELS = ("Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-3B", "Llama-3.1-8B")
DEVICES = ("raspberry-pi-4-4gb", "raspberry-pi-5-8gb", "jetson-orin-nano-8gb", "laptop-x86-16gb")


# Memory-ranking tests switch the default interactive speed floor off: they are about what
# fits; the floor's own tests are below.
NO_FLOOR = PlanOptions(min_tokens_per_second=0)


def facts(name: str):
    cfg = CONFIGS[name]
    return model_facts(cfg, synth_tensors(cfg))


def with_ram(profile, total_gib: float):
    mem = dataclasses.replace(profile.memory, total_gib=total_gib)
    return dataclasses.replace(profile, memory=mem)


def kld(plan) -> float:
    return FILE_TYPES_BY_NAME[plan.quant].kld


@pytest.mark.parametrize("model", MODELS)
def test_device_choices_fit_and_rank_devices_sensibly(model):
    f = facts(model)
    plans = {}
    for dev in DEVICES:
        p = load_profile(dev)
        try:
            plans[dev] = plan_build(f, p, NO_FLOOR)
        except BuildError:
            plans[dev] = None
            continue
        plan = plans[dev]
        assert (
            plan.format == "gguf"
            and plan.estimate.required_bytes + plan.headroom_bytes <= plan.usable_bytes
        )
        assert plan.threads == p.cpu.cores
        assert plan.gpu_layers == (f.n_layer + 1 if p.accelerator.kind == "cuda" else 0)
    laptop, pi5, pi4 = (
        plans[d] for d in ("laptop-x86-16gb", "raspberry-pi-5-8gb", "raspberry-pi-4-4gb")
    )
    # the 16 GB laptop never gets a worse quant than the 8 GB Pi 5, nor the Pi 5 than the 4 GB Pi 4
    assert kld(laptop) <= kld(pi5)
    if pi4 is not None:
        assert kld(pi5) <= kld(pi4)
        assert pi4.estimate.decode_tps < pi5.estimate.decode_tps  # no dotprod, half the bandwidth


def test_known_choices():
    pi4_4 = load_profile("raspberry-pi-4-4gb")
    assert plan_build(facts("Qwen2.5-0.5B"), load_profile("laptop-x86-16gb")).quant == "Q8_0"
    assert plan_build(facts("Qwen2.5-3B"), pi4_4, NO_FLOOR).quant == "Q6_K"  # Q8_0: over
    pi5 = load_profile("raspberry-pi-5-8gb")
    assert plan_build(facts("Llama-3.1-8B"), pi5, NO_FLOOR).quant == "Q5_K_M"
    with pytest.raises(BuildError):
        plan_build(facts("Llama-3.1-8B"), pi4_4)


def rank(plan) -> tuple[bool, int, float]:
    return (plan.low_quality, -plan.ctx, kld(plan))


@pytest.mark.parametrize("model", MODELS)
def test_more_ram_never_yields_a_worse_quant(model):
    f = facts(model)
    base = load_profile("raspberry-pi-5-8gb")
    last = None
    for gib in [x / 2 for x in range(2, 65)]:
        try:
            plan = plan_build(f, with_ram(base, gib), NO_FLOOR)
        except BuildError:
            assert last is None, f"{gib} GiB fails after a smaller size fit"
            continue
        if last is not None:
            # preference order: Q4 quality or better first, then context, then quality
            assert rank(plan) <= rank(last), gib
        last = plan
    assert last is not None


def test_context_shrinks_when_nothing_fits_and_says_so():
    plan = plan_build(
        facts("Llama-3.1-8B"), load_profile("raspberry-pi-5-8gb"), PlanOptions(ctx=65536)
    )
    assert plan.ctx < 65536
    assert any("shrunk from 65536" in line for line in plan.rationale)
    assert any(r.ctx == 65536 and r.reason.startswith("does not fit") for r in plan.rejected)


def test_nothing_fits_names_the_smallest_option_and_where_it_fits():
    with pytest.raises(BuildError) as e:
        plan_build(
            facts("Llama-3.1-8B"), load_profile("raspberry-pi-4-4gb"), alternatives=list_profiles()
        )
    assert e.value.exit_code == 5
    assert "Q2_K at ctx 512" in e.value.message and "MiB over" in e.value.message
    assert "raspberry-pi-4-8gb" in e.value.hint and "raspberry-pi-4-4gb" not in e.value.hint


def test_forced_quant_that_does_not_fit_is_an_error_with_numbers():
    with pytest.raises(BuildError) as e:
        plan_build(
            facts("Llama-3.1-8B"),
            load_profile("raspberry-pi-5-8gb"),
            PlanOptions(quant="F16", ctx=4096),
        )
    assert "F16" in e.value.message and "MiB" in e.value.message
    plan = plan_build(
        facts("Qwen2.5-0.5B"), load_profile("raspberry-pi-5-8gb"), PlanOptions(quant="q4_0")
    )
    assert plan.quant == "Q4_0" and "as asked" in plan.rationale[1]


def test_speed_floor_trades_quality_for_speed():
    f, pi5 = facts("Qwen2.5-3B"), load_profile("raspberry-pi-5-8gb")
    free = plan_build(f, pi5, NO_FLOOR)
    fast = plan_build(f, pi5, PlanOptions(min_tokens_per_second=free.estimate.decode_tps * 1.5))
    assert kld(fast) > kld(free)
    assert fast.estimate.decode_tps >= free.estimate.decode_tps * 1.5
    assert any(r.reason.startswith("too slow") for r in fast.rejected)
    with pytest.raises(BuildError) as e:
        plan_build(f, pi5, PlanOptions(min_tokens_per_second=1000))
    assert "1000 tok/s" in e.value.message


def test_bad_options_are_usage_errors():
    f, pi5 = facts("Qwen2.5-0.5B"), load_profile("raspberry-pi-5-8gb")
    with pytest.raises(UsageError):
        plan_build(f, pi5, PlanOptions(quant="Q7_X"))
    with pytest.raises(UsageError):
        plan_build(f, pi5, PlanOptions(ctx=10**6))


def test_isa_decides_repacking():
    assert repack_types(load_profile("raspberry-pi-4-4gb")) == frozenset()
    assert "Q4_0" in repack_types(load_profile("raspberry-pi-5-8gb"))
    assert "Q8_0" not in repack_types(load_profile("laptop-x86-16gb"))
    pi4 = plan_build(
        facts("Qwen2.5-0.5B"), load_profile("raspberry-pi-4-4gb"), PlanOptions(quant="Q4_0")
    )
    assert pi4.estimate.repack_duplicate_bytes == 0


def test_encoder_goes_to_onnx_and_json_schema_is_stable():
    cfg = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "vocab_size": 30522,
        "max_position_embeddings": 512,
    }
    tensors = {
        "model.safetensors": {
            "embeddings.word_embeddings.weight": ("F32", [30522, 384]),
            "encoder.layer.0.attention.self.query.weight": ("F32", [384, 384]),
            "encoder.layer.0.attention.self.query.bias": ("F32", [384]),
        }
    }
    plan = plan_build(model_facts(cfg, tensors), load_profile("raspberry-pi-4-4gb"))
    d = plan.to_dict()
    # A CPU device gets int8, not fp32 (issue #7's per-device-class policy).
    assert (d["format"], d["quant"], d["ctx"], d["speed"]["decode_tokens_per_second"]) == (
        "onnx",
        "int8",
        512,
        None,
    )
    assert any(r["quant"] == "fp32" and "--quant fp32" in r["reason"] for r in d["rejected"])
    jetson = plan_build(model_facts(cfg, tensors), load_profile("jetson-orin-nano-8gb"))
    assert (jetson.format, jetson.quant) == ("onnx", "fp16")
    assert list(d) == [
        "schema",
        "model",
        "device",
        "format",
        "quant",
        "engine",
        "ctx",
        "threads",
        "batch",
        "ubatch",
        "gpu_layers",
        "memory",
        "speed",
        "quality",
        "rationale",
        "rejected",
        "speed_floor",
        "warnings",
        "parallel",
        "flash_attn",
    ]
    assert d["flash_attn"] is False  # ONNX: llama.cpp's kernels do not apply
    assert d["parallel"] == 1 and d["memory"]["kv_cache_slots"] == 1  # an encoder: no slots
    assert d["schema"] == 1 and d["device"]["digest"].startswith("sha256:")


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["Q4_K_M", "Q4_0", "Q8_0"])
def test_gguf_sizes_match_llama_cpp_for_smollm2(quant, smollm2_dir, smollm2_f16_gguf, tmp_path):
    """Facts from the SmolLM2 folder's safetensors headers predict, tensor by tensor, what
    llama.cpp's quantizer makes of the converter's F16 GGUF."""
    import gguf
    from support.smollm import quantize_gguf

    from edgepack.build.hub import read_model_metadata
    from edgepack.plan.estimate import estimate_gguf, gguf_tensors
    from edgepack.plan.quants import gguf_tensor_plan, tensor_nbytes

    out = quantize_gguf(smollm2_f16_gguf, tmp_path / f"{quant}.gguf", quant)
    real = {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in gguf.GGUFReader(str(out)).tensors}
    meta = read_model_metadata(str(smollm2_dir))
    f = model_facts(meta.config, meta.safetensors)
    types, n_fallback = gguf_tensor_plan(
        FILE_TYPES_BY_NAME[quant], gguf_tensors(f), n_layer=f.n_layer, n_gqa=f.n_gqa
    )
    assert set(types) == set(real)
    for t in gguf_tensors(f):
        assert (types[t.name], tensor_nbytes(types[t.name], t.shape)) == real[t.name], t.name
    laptop = load_profile("laptop-x86-16gb")
    est = estimate_gguf(f, laptop, quant, 2048)
    assert est.weights_bytes == sum(n for _, n in real.values())
    if quant == "Q4_K_M":
        # width 576 is not a multiple of 256: llama.cpp reports 180 of 272 tensors falling back,
        # which makes Q4_K_M larger than Q4_0 for this model
        assert n_fallback == 180
        assert est.weights_bytes > estimate_gguf(f, laptop, "Q4_0", 2048).weights_bytes


def test_gpu_offload_all_layers_on_shared_memory_and_what_fits_in_dedicated_vram():
    f = facts("Llama-3.1-8B")
    orin = load_profile("jetson-orin-nx-16gb")
    assert plan_build(f, orin).gpu_layers == f.n_layer + 1
    # a made-up laptop with a 4 GB dedicated GPU (no such profile ships): a Q4 8B model does
    # not fit in 4 GB, so only part of the layers go to the GPU
    acc = dataclasses.replace(orin.accelerator, memory="dedicated", memory_gib=4.0)
    laptop = dataclasses.replace(load_profile("laptop-x86-16gb"), accelerator=acc)
    plan = plan_build(f, laptop, PlanOptions(quant="Q4_K_M"))
    assert 0 < plan.gpu_layers < f.n_layer + 1
    assert any(f"{plan.gpu_layers} of 33 layers" in line for line in plan.rationale)


# -- what an expert picks (issue 12) -----------------------------------------------------------


def test_default_floor_keeps_q4_for_a_big_model_on_a_pi5():
    # Llama-3-8B on a Pi 5: nothing reaches reading speed, so take the fastest option of Q4
    # quality, not Q5_K_M at ~1.7 tok/s; say so.
    plan = plan_build(facts("Llama-3.1-8B"), load_profile("raspberry-pi-5-8gb"))
    assert plan.quant in ("Q4_K_M", "Q4_0")
    assert not plan.low_quality and plan.speed_floor["met"] is False
    assert plan.speed_floor["tokens_per_second"] == 5.0
    assert "interactive floor of a sbc device" in plan.speed_floor["source"]
    assert any("below the interactive floor" in w for w in plan.warnings)
    # a Q5/Q6 option that fits was passed over for speed, and the record says why
    assert any(r.quant == "Q5_K_M" and r.reason.startswith("too slow") for r in plan.rejected)
    d = plan.to_dict()
    assert d["speed_floor"]["met"] is False and d["warnings"] and d["quality"]["low"] is False


def test_a_small_model_keeps_the_best_quality_when_the_floor_is_met():
    plan = plan_build(facts("Qwen2.5-0.5B"), load_profile("raspberry-pi-5-8gb"))
    assert plan.quant == "Q8_0" and plan.speed_floor["met"] and not plan.warnings


def test_context_shrinks_before_dropping_below_q4():
    # A 7B without GQA on an 8 GB Jetson: Q4_K_M at ctx 2048, not Q2_K at 4096.
    plan = plan_build(facts("Llama-2-7B"), load_profile("jetson-orin-nano-8gb"))
    assert (plan.quant, plan.ctx) == ("Q4_K_M", 2048) and not plan.low_quality
    assert any("shrunk from 4096 to 2048" in line for line in plan.rationale)
    assert any(r.quant == "Q4_K_M" and r.ctx == 4096 and r.reason.startswith("does not fit")
               for r in plan.rejected)


def test_q3_and_q2_are_flagged_low_quality():
    # Only Q3/Q2 fit an 8B on 6 GiB even at the smallest context: chosen, and flagged.
    tight = with_ram(load_profile("raspberry-pi-5-8gb"), 5.5)
    plan = plan_build(facts("Llama-3.1-8B"), tight)
    assert plan.quant in ("Q3_K_M", "Q2_K") and plan.low_quality
    assert any("low quality" in w for w in plan.warnings)
    assert plan.to_dict()["quality"]["low"] is True
    # Q4 was tried at every context first
    assert {r.ctx for r in plan.rejected if r.quant == "Q4_0"} >= {4096, 512}


def test_explicit_floor_still_fails_when_nothing_reaches_it():
    with pytest.raises(BuildError) as e:
        plan_build(facts("Llama-3.1-8B"), load_profile("raspberry-pi-5-8gb"),
                   PlanOptions(min_tokens_per_second=5))
    assert "5 tok/s" in e.value.message and e.value.exit_code == 5


def test_step_up_ladder_is_the_planners_own_tables_and_the_plan_says_so():
    """The build steps up along the planner's quant tables (next precision first); plan says so
    in its rationale when it chose, not when --quant did; a step-up plan names where it came
    from instead of "as asked with --quant"."""
    assert higher_precision("gguf", "Q4_K_M") == ("Q5_0", "Q5_K_M", "Q6_K", "Q8_0", "F16")
    assert higher_precision("gguf", "q8_0") == ("F16",)
    assert higher_precision("onnx", "int4") == ("int8", "fp16", "fp32")
    assert higher_precision("onnx", "fp32") == () and higher_precision("gguf", "F16") == ()
    cpu, jetson = load_profile("laptop-x86-16gb"), load_profile("jetson-orin-nano-8gb")
    assert "fp16 kernels" in (step_up_skip("onnx", "fp16", profile=cpu) or "")
    assert step_up_skip("onnx", "fp16", profile=jetson) is None
    assert step_up_skip("onnx", "fp32", profile=cpu) is None  # a size preference, not a limit
    assert step_up_skip("gguf", "F16", profile=cpu) is None
    f = facts("Qwen2.5-0.5B")
    chosen = plan_build(f, cpu)
    assert any(f"if {chosen.quant} fails validation, the build steps up" in r
               for r in chosen.rationale)
    asked = plan_build(f, cpu, PlanOptions(quant="Q4_0"))
    assert not any("steps up" in r for r in asked.rationale)
    stepped = plan_build(f, cpu, PlanOptions(quant="F16", ctx=chosen.ctx, step_up_from="Q8_0"))
    assert stepped.rationale[1].startswith("F16: stepped up by the build from the planner's Q8_0")
    assert "step_up" not in stepped.to_dict()  # the build adds the attempts it made


def test_decoders_plan_for_flash_attention_and_the_build_can_plan_without_it():
    """GGUF decoders are planned (and served) with flash attention; without it llama.cpp
    keeps a micro-batch's attention scores against the whole context, so the same quant at a
    long context needs more memory and may no longer fit (the build's fallback asks again)."""
    model = facts("Qwen2.5-0.5B")
    profile = load_profile("raspberry-pi-5-8gb")
    opts = PlanOptions(quant="Q8_0", ctx=8192)
    fa = plan_build(model, profile, opts)
    plain = plan_build(model, profile, dataclasses.replace(opts, flash_attn=False))
    assert fa.flash_attn and fa.to_dict()["flash_attn"] is True
    assert not plain.flash_attn and plain.to_dict()["flash_attn"] is False
    assert fa.estimate.weights_bytes == plain.estimate.weights_bytes
    assert fa.estimate.kv_bytes == plain.estimate.kv_bytes
    # 14 heads x 8192 cells x 512 tokens of f32 scores: hundreds of MiB more without it
    assert plain.estimate.compute_bytes - fa.estimate.compute_bytes > 300 * 2**20
    assert any(line.startswith("flash attention on") for line in fa.rationale)
    assert any(line.startswith("flash attention off") for line in plain.rationale)
    # A device where only the flash-attention plan fits at that context.
    need = (fa.estimate.required_bytes + plain.estimate.required_bytes) / 2
    tight = with_ram(profile, need / 0.9 / 2**30 + profile.memory.os_reserve_gib)
    assert plan_build(model, tight, opts).flash_attn
    with pytest.raises(BuildError, match="nothing fits raspberry-pi-5-8gb"):
        plan_build(model, tight, dataclasses.replace(opts, flash_attn=False))
