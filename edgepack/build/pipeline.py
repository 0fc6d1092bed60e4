"""``edgepack build``: pull once, plan per device, convert once, quantize per quant, validate,
write one bundle per device.

The stages are the modules named for them (hub, planner, converter, quantize, validate,
bundle); this module only orders them, caches what several devices share, and decides where
files go. Build side: it may import the heavy libraries, lazily through those modules.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.build.outputs import ModelOutput, gguf_output, onnx_output
from edgepack.build.request import (  # noqa: F401 - re-exported: callers import them from here
    BuildRequest,
    BuildResult,
    BundleSummary,
    Golden,
    build_stage,
    cache_root,
    parse_version_option,
)
from edgepack.build.step_up import Key, Replan, output_for
from edgepack.bundle import BundleSpec, archive_bundle, write_bundle
from edgepack.errors import UsageError
from edgepack.manifest import parse_bundle_version

if TYPE_CHECKING:
    from edgepack.device.profile import DeviceProfile
    from edgepack.plan.planner import Plan


def _source_digest(files: dict[str, str]) -> str:
    """A stable id for a local folder's content, standing in for a commit sha."""
    h = hashlib.sha256()
    for path, digest in sorted(files.items()):
        h.update(f"{path}\0{digest}\n".encode())
    return h.hexdigest()[:40]


def _model_kind(facts: Any, folder: Path) -> str:
    if facts.family == "encoder":
        return "embedding"
    tok_cfg = folder / "tokenizer_config.json"
    has_template = (folder / "chat_template.jinja").is_file() or (
        tok_cfg.is_file() and "chat_template" in json.loads(tok_cfg.read_text(encoding="utf-8"))
    )
    return "chat" if has_template else "completion"


def server_tables(
    plan: Plan, model_rel: str, kind: str, name: str, profile: Any
) -> dict:
    engine: dict[str, Any] = {}
    if plan.format == "onnx":
        # CUDA first where the device has it; the engine refuses to start (exit 7) with a clear
        # message when this onnxruntime lacks a provider named here.
        cuda = profile.accelerator.kind == "cuda"
        engine["providers"] = ["cuda", "cpu"] if cuda else ["cpu"]
    else:
        # Slots decoded together (runtimes/batch.py), sized by the plan: its memory figure
        # holds the KV cache of every slot (plan/slots.py).
        engine["n_parallel"] = plan.parallel
        # The attention kernels the build validated with (build/step_up.py); the server
        # runs the same, so what it answers is what was validated.
        engine["flash_attn"] = plan.flash_attn
    return {
        "model": {"path": model_rel, "format": plan.format, "kind": kind, "name": name},
        "engine": {
            "name": plan.engine,
            "n_ctx": plan.ctx,
            "n_threads": plan.threads,
            "n_batch": plan.batch,
            "n_ubatch": plan.ubatch,
            "n_gpu_layers": plan.gpu_layers,
            **engine,
        },
        "server": {
            "queue_size": 8,
            "max_body_bytes": 1 << 20,
            "drain_seconds": 30,
            "request_timeout_seconds": 300,
        },
    }


def plan_systemd_units(plan: Plan) -> dict[str, str]:
    from edgepack.runtimes.systemd import render_units

    return dict(render_units(memory_bytes=plan.estimate.required_bytes,
                             gpu_offload=plan.gpu_layers > 0))


def _estimated_disk_need(meta: Any, facts: Any, plans: Sequence[Plan]) -> int:
    source = sum(f.size or 0 for f in meta.files)
    intermediate = facts.n_params * 4
    outputs = sum(p.estimate.weights_bytes for p in plans)
    return source + intermediate + outputs


def run_build(req: BuildRequest, log: Callable[[str], None] = lambda _m: None) -> BuildResult:
    """Build one bundle per device named in ``req``; return where they went.

    Raises UsageError (bad options), ProfileError (unknown device), FetchError (pull),
    BuildError (nothing fits, conversion, quantization, validation, disk space).
    """
    from edgepack.build.gguf_validate import reference_scores_kept

    # Every quant of this build is validated against one reference, scored once; the scores
    # (up to ~200 MB) are freed when the build ends.
    with reference_scores_kept():
        return _run_build(req, log)


def _run_build(req: BuildRequest, log: Callable[[str], None]) -> BuildResult:
    from edgepack.build.checkpoint_compat import make_working_copy
    from edgepack.build.hub import (
        parse_model_ref,
        pull_model,
        read_model_metadata,
    )
    from edgepack.build.model_card import LicensePolicy, describe_derivation
    from edgepack.build.model_files import check_disk_space
    from edgepack.build.preflight import check_request, model_name
    from edgepack.build.sbom import require_sbom_writer
    from edgepack.device.catalog import list_profiles
    from edgepack.device.profile import profile_digest
    from edgepack.device.resolve import for_format, load_profile
    from edgepack.plan.facts import model_facts
    from edgepack.plan.planner import PlanOptions, plan_build, planned_format, step_up_skip

    require_sbom_writer()  # every bundle gets an ML-BOM: fail now, not after a conversion
    if not req.devices:
        raise UsageError("no --device given", hint="name at least one: edgepack profiles list")
    parse_bundle_version(req.bundle_version)
    # Before any network; `local`'s llama.cpp decode rate only once a plan needs it.
    profiles = [load_profile(d, decode_rate=False) for d in req.devices]
    ids = [p.id for p in profiles]
    if len(set(ids)) != len(ids):
        raise UsageError(f"--device names a profile twice: {', '.join(ids)}")
    if req.runtime:
        from edgepack.build.runtime_pack import check_pack_profile

        for profile in profiles:
            check_pack_profile(profile)
    ref = parse_model_ref(req.model)
    # Options and the output location, before any network or compute.
    check_request(req, ref, profiles)

    log(f"reading model facts of {ref.text}")
    # The licence policy is checked on the model card before any weight byte is requested.
    policy = LicensePolicy.parse(req.allow_licenses)
    from edgepack.build.gguf_repo import probe_gguf_repo

    gguf_repo = probe_gguf_repo(ref, token=req.token, policy=policy)
    if gguf_repo is not None:  # .gguf files and no checkpoint: pick one, nothing to convert
        from edgepack.build.gguf_repo_build import run_gguf_repo_build

        profiles = [for_format(d, p, "gguf") for d, p in zip(req.devices, profiles, strict=True)]
        return run_gguf_repo_build(req, gguf_repo, profiles, log)
    meta = read_model_metadata(ref, token=req.token, policy=policy)
    log(f"licence: {meta.card.license_label}" + (f", gated ({meta.card.gated})"
                                                 if meta.card.gated else ""))
    facts = model_facts(meta.config, meta.safetensors)
    per_device = dict(req.device_quants)
    plans: list[Plan] = []
    forced: list[bool] = []  # --quant given for the device: no step-up on a failed validation
    planned_profiles: list[DeviceProfile] = []
    for ref_text, profile in zip(req.devices, profiles, strict=True):
        quant = per_device.get(ref_text) or per_device.get(profile.id) or req.quant
        forced.append(quant is not None)
        options = PlanOptions(format=req.fmt, ctx=req.ctx, quant=quant,
                              min_tokens_per_second=req.min_tokens_per_second,
                              parallel=req.parallel)
        profile = for_format(ref_text, profile, planned_format(facts, profile, options))
        planned_profiles.append(profile)  # what the plan, its step-ups and the bundle use
        plan = plan_build(facts, profile, options, alternatives=list_profiles())
        plans.append(plan)
        log(f"plan for {profile.id}: {plan.format} {plan.quant} ctx {plan.ctx}")
        for warning in plan.warnings:  # e.g. a speed measured while the machine was busy
            log(f"plan warning ({profile.id}): {warning}")
    profiles = planned_profiles

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    check_disk_space(root, _estimated_disk_need(meta, facts, plans))
    with build_stage(log, "pull", "pulling model files"):
        pulled = pull_model(ref, token=req.token)
    source_id = pulled.sha or _source_digest(pulled.files)
    # Files written by transformers 5 are rewritten, in a build-owned copy, into what the
    # build's transformers 4 and llama.cpp's converter read (edgepack.build.checkpoint_compat).
    work = make_working_copy(pulled.folder, root, source_id)
    for change in work.changes:
        log(f"working copy: {change}")
    folder = work.folder
    content_id = source_id
    if work.changes:  # the conversions' cache keys follow the rewritten files
        source_id = f"{source_id}-wc{work.to_dict()['recipe']}"
    name = model_name(req.name, ref)
    kind = _model_kind(facts, folder)
    source = {
        "ref": ref.text,
        "repo_id": pulled.repo_id,
        "revision": pulled.sha,
        "requested_revision": None if ref.is_local else ref.revision,
        "content_digest": None if pulled.sha else content_id,
        "files": dict(sorted(pulled.files.items())),
    }
    if work.changes:
        source["working_copy"] = work.to_dict()

    outputs: dict[Key, ModelOutput] = {}
    failures: dict[Key, Any] = {}  # (format, quant, flash attention) -> its ValidationFailed
    packs: dict[tuple[Any, ...], Any] = {}
    # quant -> what its quantization reported, for files made in this build: validating a quant
    # again without flash attention (step_up.py) reuses the file instead of quantizing again
    quantized: dict[str, dict[str, Any]] = {}
    result = BuildResult()

    def make(plan: Plan) -> ModelOutput:
        if plan.format == "gguf":
            return gguf_output(req, folder, source_id, facts, plan, kind, name, log,
                                quantized)
        return onnx_output(req, folder, source_id, plan, kind, name, log)

    for profile, planned, is_forced in zip(profiles, plans, forced, strict=True):
        plan, out = output_for(
            planned, forced=is_forced, outputs=outputs, failures=failures, make=make,
            replan=_replanner(req, facts, profile, planned.ctx, list_profiles()),
            step_up_skip=partial(step_up_skip, planned.format, profile=profile),
            log=log,
        )
        pack = runtime_pack_for(req, profile, plan.format, packs, log) if req.runtime else None
        bundle_name = f"{name}-{profile.id}"
        model_rel = f"model/{out.model_file.name}"
        spec = BundleSpec(
            name=bundle_name,
            version=req.bundle_version,
            model_file=out.model_file,
            model_name=name,
            model_format=plan.format,
            model_kind=kind,
            quant=plan.quant,
            plan=plan.to_dict(),
            server=server_tables(plan, model_rel, kind, name, profile),
            source=source,
            device={"profile_id": profile.id, "profile_digest": profile_digest(profile)},
            engine=out.engine,
            validation=out.validation,
            extra_model_files=out.extra_files,
            tokenizer_files=out.tokenizer_files,
            golden_prompts=out.golden,
            model_details=out.details,
            converter=out.converter,
            systemd_units=plan_systemd_units(plan),
            card=meta.card.to_dict(),
            derivation=describe_derivation(meta.card, source, plan.format, plan.quant,
                                           out.converter, out.engine, out.validation),
            license_files=tuple((f.path, f.local.resolve()) for f in meta.card.license_files),
            runtime_files=pack.files if pack else {},
            runtime=pack.info if pack else None,
        )
        emit_bundle(req, spec, profile.id, result, log)
        result.notes.extend(pack.notes if pack else ())
    for p in packs.values():
        p.cleanup()
    return result


def _replanner(req: BuildRequest, facts: Any, profile: Any, ctx: int,
               alternatives: Sequence[Any]) -> Replan:
    """Plan ``profile`` again at an explicit quant (the build's step-up), at the planned
    context: a higher precision that fits only at a shorter context does not fit."""
    from edgepack.plan.planner import PlanOptions, plan_build

    def replan(quant: str, planned: str | None, *, flash_attn: bool = True) -> Plan:
        options = PlanOptions(format=req.fmt, ctx=ctx, quant=quant,
                              min_tokens_per_second=req.min_tokens_per_second,
                              parallel=req.parallel, step_up_from=planned,
                              flash_attn=flash_attn)
        return plan_build(facts, profile, options, alternatives=alternatives)

    return replan


def emit_bundle(req: BuildRequest, spec: BundleSpec, device_id: str, result: BuildResult,
                log: Callable[[str], None]) -> Path:
    """Write one bundle (with its ML-BOM), archive it when asked, and record its summary.

    Shared by checkpoint builds and GGUF-repo builds, so every bundle gets the same documents.
    """
    from edgepack.build.sbom import write_sbom

    path = write_bundle(spec, Path(req.out) / spec.name, overwrite=req.overwrite,
                        documents=write_sbom(spec))
    log(f"wrote {path}")
    result.bundles.append(path)
    archive = None
    if req.archive:
        with build_stage(log, "archive", f"packing {path.name}.tar"):
            archive = archive_bundle(path, path.with_name(path.name + ".tar"))
        result.archives.append(archive)
    result.summaries.append(BundleSummary(
        device=device_id, path=path, format=spec.model_format, quant=spec.quant,
        size_bytes=sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
        validation=dict(spec.validation), archive=archive,
        step_up=tuple(spec.plan.get("step_up") or ()),
    ))
    return path


def runtime_pack_for(req: BuildRequest, profile: Any, fmt: str, packs: dict[tuple[Any, ...], Any],
                  log: Callable[[str], None]) -> Any:
    """One runtime pack per (platform, CPU, engine, accelerator), shared by the devices that
    have the same (a Pi 5 8 GB and 16 GB get the same wheels)."""
    import atexit

    from edgepack.build.runtime_pack import build_runtime_pack

    key = (profile.cpu.target, profile.software, fmt, profile.accelerator.kind)
    if key not in packs:
        with build_stage(log, "runtime", f"runtime pack for {profile.id}"):
            packs[key] = build_runtime_pack(profile, fmt, cache_root(), log)
        atexit.register(packs[key].cleanup)  # a build that fails later leaves no temp files
    return packs[key]
