"""``edgepack plan MODEL --device ID``: the build plan, without downloading weights.

Model facts come from config.json and the safetensors headers (ranged reads on the hub, the
header bytes of a local file); the device from a shipped profile id, a profile .toml path or
``local``. The plan itself is :func:`edgepack.plan.planner.plan_build`.

``--json`` prints one object (schema 1; new keys may be added, existing ones keep meaning)::

    {
      "schema": 1,
      "source": {"ref": "org/name@rev" | "/path", "repo_id": str | null, "sha": str | null},
      "model": {"architecture", "model_type", "family": "decoder" | "encoder", "n_params",
                "n_layer", "hidden_size", "n_head", "n_kv_head", "head_dim", "ffn_size",
                "vocab_size", "max_context", "tied_embeddings", "n_tensors"},
      "device": {"id", "name", "digest": "sha256:...", "effective_bandwidth_gbps",
                 # GGUF plans: what the CPU decode estimate used and where it came from
                 "decode_gflops", "compute_basis": "measured: ..." | "nominal: ...",
                 "measured_decode_gflops_range": [slowest, fastest] | null,  # probe chunks
                 "prompt_gflops", "prompt_basis": "measured: ..." | "nominal: ...",
                 "measured_prompt_gflops_range": [slowest, fastest] | null,  # probe batches
                 "bandwidth_basis": "measured" | "theoretical x derating"},
      "format": "gguf" | "onnx",
      "quant": "Q4_K_M" | ... | "int8" | ...,    # llama.cpp file type or ONNX weight format
      "engine": "llama.cpp" | "onnxruntime",
      "ctx": int, "threads": int, "batch": int, "ubatch": int,
      "gpu_layers": int,                        # 0 = CPU only
      "memory": {"weights_bytes", "kv_cache_bytes",  # KV: every slot's (see "parallel")
                 "kv_cache_slots", "compute_buffer_bytes",
                 "output_buffer_bytes", "runtime_overhead_bytes", "required_bytes",
                 "repack_page_cache_bytes", "expected_peak_rss_bytes",
                 "tensor_types": {ggml type: count}, "fallback_tensors",
                 "usable_bytes", "headroom_bytes", "free_after_headroom_bytes"},
      "speed": {"decode_tokens_per_second": float | null, "prompt_tokens_per_second": float,
                "bytes_read_per_token": int},
      "quality": {"metric": "kld_llama3_8b" | "rank", "value": float,
                  "low": bool},                 # true for Q3/Q2-class choices
      "rationale": [str, ...],
      "rejected": [{"format", "quant", "ctx", "reason", "file"?}, ...],
      "speed_floor": {"tokens_per_second": float, "source": str, "met": bool},
      "warnings": [str, ...],   # low quality, floor not met, transformers-5 working copy
      "parallel": int,          # slots decoded together (server.toml n_parallel); 1 unless a
                                # GGUF decoder
      "gguf_file": {"path", "files": [str], "quant", "quality_basis"},  # GGUF repos only
      "card": {"license", "license_name", "license_link", "base_model": [str], "datasets": [str],
               "language": [str], "pipeline_tag", "gated": "auto" | "manual" | null,
               "readme_sha256", "license_files": [{"path", "sha256", "size"}]}
    }

Exit codes: 2 bad option (unknown --quant, --ctx above the model's maximum, --parallel for a
model without slots), 3 unknown device or a licence that ``--allow-license`` refuses (decided
on the model card, before any weight byte), 4 hub unreachable, 5 nothing fits (incl. the
--parallel slots asked) / unsupported architecture.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click


@click.command("plan")
@click.argument("model")
@click.option(
    "--device",
    "device",
    required=True,
    help="Device profile: a shipped id (see 'edgepack profiles list'), a .toml path, or 'local'.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "gguf", "onnx"]),
    default="auto",
    show_default=True,
    help="Model format; auto: encoders ONNX, decoders GGUF.",
)
@click.option(
    "--ctx",
    type=click.IntRange(min=1),
    default=None,
    help="Context length in tokens (default: min(model maximum, 4096), shrunk to fit).",
)
@click.option(
    "--quant",
    default=None,
    help="Force a quantization (GGUF: Q8_0, Q6_K, Q5_K_M, Q5_0, Q4_K_M, Q4_0, Q3_K_M, "
    "Q2_K, F16; ONNX: fp32, fp16, int8, int4).",
)
@click.option(
    "--min-tokens-per-second",
    "min_tps",
    type=click.FloatRange(min=0.0),
    default=None,
    help="Reject options whose estimated decode speed is below this (default: the device "
    "class's interactive floor, 5 tok/s = reading speed, which picks the fastest option of "
    "Q4 quality when nothing reaches it; 0 turns it off).",
)
@click.option(
    "--parallel",
    type=click.IntRange(min=1),
    default=None,
    help="Slots for a GGUF chat/completion model, decoded together (KV cache for each in the "
    "memory plan). Default: as many as fit, up to one per core and 4; exit 5 when the number "
    "asked does not fit.",
)
@click.option("--allow-license", "allow_licenses", multiple=True, metavar="LIST",
              envvar="EDGEPACK_ALLOW_LICENSE", show_envvar=True,
              help="Licences the model may have, by model-card id (apache-2.0,mit); exit 3 "
              "when refused. Comma-separated or repeated; @FILE reads a policy file (one id a "
              "line).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the plan as one JSON object (schema: docs/json.md#plan).")
def plan(
    model: str,
    device: str,
    fmt: str,
    ctx: int | None,
    quant: str | None,
    min_tps: float | None,
    parallel: int | None,
    allow_licenses: tuple[str, ...],
    as_json: bool,
) -> None:
    """Plan a build of MODEL (org/name[@rev] or a local folder) for a device, without
    downloading weights."""
    from edgepack.build.hub import read_model_metadata
    from edgepack.build.model_card import LicensePolicy
    from edgepack.device.catalog import list_profiles
    from edgepack.device.resolve import for_format, load_profile
    from edgepack.plan.facts import model_facts
    from edgepack.plan.planner import PlanOptions, plan_build, planned_format

    # Before any network: a typo'd device fails fast (`local`'s llama.cpp decode rate is
    # measured only if the plan is GGUF).
    profile = load_profile(device, decode_rate=False)
    if quant is not None:
        from edgepack.build.preflight import check_quant

        fmt = check_quant(quant, fmt)
    options = PlanOptions(format=fmt, ctx=ctx, quant=quant, min_tokens_per_second=min_tps,
                          parallel=parallel)
    from edgepack.build.gguf_repo import probe_gguf_repo
    from edgepack.build.hub import parse_model_ref

    policy = LicensePolicy.parse(allow_licenses)
    ref = parse_model_ref(model)
    # A repo of .gguf files (no checkpoint): plan over its files, from their headers.
    repo = probe_gguf_repo(ref, policy=policy)
    if repo is not None:
        from edgepack.build.gguf_repo_build import plan_gguf_repo

        profile = for_format(device, profile, "gguf")
        result = plan_gguf_repo(repo, profile, fmt=fmt, ctx=ctx, quant=quant,
                                min_tokens_per_second=min_tps, alternatives=list_profiles(),
                                parallel=parallel)
        src = {"ref": ref.text, "repo_id": repo.repo_id, "sha": repo.sha}
        card = repo.card
    else:
        meta = read_model_metadata(ref, policy=policy)
        facts = model_facts(meta.config, meta.safetensors)
        profile = for_format(device, profile, planned_format(facts, profile, options))
        result = plan_build(facts, profile, options, alternatives=list_profiles())
        from edgepack.build.checkpoint_compat import working_copy_warning

        compat = working_copy_warning(meta.config, meta.tokenizer_config,
                                      [f.path for f in meta.files],
                                      _local_folder(ref))
        if compat:
            result = dataclasses.replace(result, warnings=(*result.warnings, compat))
        src = {"ref": meta.ref.text, "repo_id": meta.repo_id, "sha": meta.sha}
        card = meta.card
    if as_json:
        data = result.to_dict()
        data = {
            "schema": data.pop("schema"),
            "source": src,
            **data,
            "card": card.to_dict(),
        }
        click.echo(json.dumps(data, indent=2))
        return
    from edgepack.cli.output import console
    from edgepack.cli.render import render_plan

    out = console()
    render_plan(result, out)
    texts = ", ".join(f.path for f in card.license_files) or "none in the repo"
    out.print(f"licence: {card.license_label}"
              + (f", {card.license_link}" if card.license_link else "")
              + f"; licence texts: {texts}", markup=False, highlight=False)
    if card.gated:
        out.print(f"gated: yes ({card.gated}); pulling needs a token of an account that "
                  "accepted the terms (HF_TOKEN)", markup=False, highlight=False)
    if card.base_model or card.datasets:
        out.print(f"base model: {', '.join(card.base_model) or '-'}; datasets: "
                  f"{', '.join(card.datasets) or '-'}", markup=False, highlight=False)



def _local_folder(ref: Any) -> Path | None:
    """Where the model's files lie on disk: a local folder, or offline the cached snapshot
    (over the network plan fetches no tokenizer.json, so there is none)."""
    from edgepack.build.hub_cache import cached_snapshot
    from edgepack.build.hub_client import hub_cache_dir, hub_endpoint, hub_offline

    if ref.path is not None:
        return Path(ref.path)
    if not hub_offline():
        return None
    return cached_snapshot(ref, None, hub_endpoint(None), hub_cache_dir(None))
