"""``edgepack build`` of a GGUF repo: plan over the repo's files, pull only the chosen one(s),
validate, bundle (build side).

There is nothing to convert or quantize: the planner (:func:`edgepack.plan.planner.plan_build`
with ``files``) picks, per device, the best file that fits by the same rules as for a
checkpoint, each file estimated from its own header. Validation loads the chosen file with
llama.cpp and

- compares it with a **higher-precision file of the same repo** (top-token agreement and KL
  divergence, :func:`edgepack.build.gguf_validate.validate_gguf`) when the repo has one that
  fits on this build machine (its file size at most half of the memory available now: two
  models are never loaded at once, and the rest is for the process and the page cache);
- answers the golden prompts through the chat template stored in the file (a chat model).

When the planner chose the file (no ``--quant``) and it fails validation
(:class:`~edgepack.errors.ValidationFailed`: agreement, KL or a golden prompt; with and then
without flash attention, see :mod:`edgepack.build.step_up`), the build steps up to the repo's
next file of higher precision that the planner accepts (:func:`step_up_ladder`), planned from
its header at the planned context, downloaded only then, and validated the same way; the
attempts go into the plan's ``step_up`` record exactly as for a conversion.

The manifest's ``model.gguf_repo`` records the chosen file, why (the plan's
rationale), every candidate with its size and quality figure, and the reference used.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgepack.build.step_up import Key, output_for
from edgepack.errors import BuildError, FetchError, UsageError, ValidationFailed

if TYPE_CHECKING:
    from edgepack.build.gguf_repo import GgufRepo
    from edgepack.build.hub import PulledModel
    from edgepack.build.request import BuildRequest, BuildResult
    from edgepack.device.profile import DeviceProfile
    from edgepack.plan.planner import FileChoice, Plan

# A reference file may take at most this share of the memory available at build time.
REFERENCE_MEMORY_SHARE = 0.5


def plan_gguf_repo(repo: GgufRepo, profile: DeviceProfile, *, fmt: str = "auto",
                   ctx: int | None = None, quant: str | None = None,
                   min_tokens_per_second: float | None = None,
                   alternatives: Sequence[DeviceProfile] = (),
                   parallel: int | None = None, flash_attn: bool = True,
                   step_up_from: str | None = None) -> Plan:
    """The plan for ``profile`` over the repo's files. Raises BuildError when it has none."""
    from edgepack.plan.planner import PlanOptions, plan_build

    if not repo.choices:
        raise BuildError(f"{repo.ref.text} holds no usable .gguf file",
                         hint="pick a repo with GGUF files or a safetensors checkpoint")
    best = min(repo.choices, key=lambda c: (c.kld, c.path))
    options = PlanOptions(format=fmt, ctx=ctx, quant=quant,
                          min_tokens_per_second=min_tokens_per_second, parallel=parallel,
                          flash_attn=flash_attn, step_up_from=step_up_from)
    try:
        plan = plan_build(best.facts, profile, options, alternatives=alternatives,
                          files=repo.choices)
    except UsageError as e:
        if not repo.offline or quant is None:
            raise
        # Offline, the candidates are the files an earlier build pulled, not the repo's.
        cached = ", ".join(f"{c.quant} ({c.path})" for c in repo.choices)
        raise FetchError(
            f"--quant {quant!r}: no such GGUF file in the local cache of {repo.ref.text}, and "
            f"the hub cannot be used (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')}); "
            f"cached: {cached}",
            hint="build with one of the cached files, or pull it once online (unset "
                 "HF_HUB_OFFLINE)") from e
    if repo.offline:
        import dataclasses

        note = (f"offline: planned over the {len(repo.choices)} GGUF file(s) in the local "
                f"cache ({', '.join(c.path for c in repo.choices)}), not every file of the "
                "repo; online the choice may differ")
        plan = dataclasses.replace(plan, warnings=(*plan.warnings, note))
    return plan


def _available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def file_size(repo: GgufRepo, choice: FileChoice) -> int:
    sizes = {f.path: f.size or 0 for f in repo.files}
    return sum(sizes.get(p, 0) for p in choice.files)


def pick_reference(repo: GgufRepo, chosen: FileChoice,
                   available: int | None = None) -> tuple[FileChoice | None, str]:
    """The highest-precision other file of the repo that fits on this machine, and why
    (or None and why not)."""
    better = sorted((c for c in repo.choices if c.kld < chosen.kld), key=lambda c: c.kld)
    if not better:
        return None, f"the repo has no file of higher precision than {chosen.quant}"
    room = int((available if available is not None else _available_memory())
               * REFERENCE_MEMORY_SHARE)
    for c in better:
        if file_size(repo, c) <= room:
            return c, (f"{c.quant} ({c.path}), the highest-precision file of the repo that "
                       f"fits in half of this machine's available memory")
    return None, (f"no higher-precision file fits in half of this machine's available memory "
                  f"({room / 2**20:,.0f} MiB); validated with golden prompts only")


def _choice_of(repo: GgufRepo, plan: Plan) -> FileChoice:
    assert plan.gguf_file is not None
    return next(c for c in repo.choices if c.path == plan.gguf_file["path"])


def step_up_ladder(repo: GgufRepo, plan: Plan) -> tuple[str, ...]:
    """The quants of the repo's files of higher precision than ``plan``'s file, next first
    (the build's step-up re-plans each by name): lower KLD first, and of the same KLD figure
    more weight bytes (a type the scoreboard lacks takes the figure of the listed type nearest
    in bits per weight: SmolLM2's Q4_1, its embeddings kept at Q8_0, ranks with Q5_K_M)."""
    def rank(c: FileChoice) -> tuple[float, int]:
        return c.kld, -sum(_nbytes(t) for t in c.facts.tensors)

    chosen = rank(_choice_of(repo, plan))
    better = sorted((c for c in repo.choices if rank(c) < chosen), key=rank, reverse=True)
    return tuple(dict.fromkeys(c.quant for c in better))


def run_gguf_repo_build(req: BuildRequest, repo: GgufRepo, profiles: Sequence[DeviceProfile],
                        log: Callable[[str], None]) -> BuildResult:
    """Build one bundle per device from a GGUF repo. Raises BuildError (nothing fits,
    validation), FetchError (pull)."""
    from edgepack.build.gguf_repo import pull_gguf_files
    from edgepack.build.model_files import check_disk_space
    from edgepack.build.preflight import model_name
    from edgepack.build.request import BuildResult, build_stage
    from edgepack.device.catalog import list_profiles
    from edgepack.plan.planner import step_up_skip

    if repo.offline:
        log(f"{repo.ref.text} is a GGUF repo, offline: planning over the "
            f"{len(repo.choices)} file(s) in the local cache: "
            + ", ".join(c.path for c in repo.choices))
    else:
        log(f"{repo.ref.text} is a GGUF repo: {len(repo.choices)} candidate file(s), "
            f"{repo.header_bytes_read / 2**20:.1f} MiB of headers read")
    per_device = dict(req.device_quants)
    plans: list[Plan] = []
    forced: list[bool] = []
    for ref_text, profile in zip(req.devices, profiles, strict=True):
        quant = per_device.get(ref_text) or per_device.get(profile.id) or req.quant
        forced.append(quant is not None)
        plan = plan_gguf_repo(repo, profile, fmt=req.fmt, ctx=req.ctx, quant=quant,
                              min_tokens_per_second=req.min_tokens_per_second,
                              alternatives=list_profiles(), parallel=req.parallel)
        plans.append(plan)
        log(f"plan for {profile.id}: {plan.quant} from {_choice_of(repo, plan).path} "
            f"ctx {plan.ctx}")
        for warning in plan.warnings:
            log(f"plan warning ({profile.id}): {warning}")

    sizes = {f.path: f.size or 0 for f in repo.files}
    pulled: PulledModel | None = None

    def pull(paths: Sequence[str], why: str) -> PulledModel:
        """Download the files of ``paths`` not pulled yet (only those: the others stay
        header reads)."""
        nonlocal pulled
        new = sorted(set(paths) - set(pulled.files if pulled else ()))
        if new or pulled is None:
            if repo.folder is None:
                from edgepack.build.hub_client import hub_cache_dir

                cache = hub_cache_dir()
                cache.mkdir(parents=True, exist_ok=True)
                check_disk_space(cache, sum(sizes.get(p, 0) for p in new))
            with build_stage(log, "pull", f"pulling {len(new)} GGUF file(s){why}"):
                got = pull_gguf_files(repo, new, token=req.token)
            pulled = got if pulled is None else replace(
                pulled, files={**pulled.files, **got.files})
        return pulled

    first = {c.path: c for c in (_choice_of(repo, p) for p in plans)}
    pull([p for c in first.values() for p in _with_reference(c, pick_reference(repo, c)[0])],
         "")
    name = model_name(req.name, repo.ref)
    outputs: dict[Key, dict[str, Any]] = {}
    failures: dict[Key, Any] = {}
    result = BuildResult()
    packs: dict[tuple[Any, ...], Any] = {}

    def make(plan: Plan) -> dict[str, Any]:
        c = _choice_of(repo, plan)
        ref, why_ref = pick_reference(repo, c)
        folder = pull(_with_reference(c, ref), f" for {c.quant}").folder
        return _validate(req, repo, folder, c, ref, why_ref, plan.flash_attn, log)

    for profile, planned, is_forced in zip(profiles, plans, forced, strict=True):
        replan = partial(_replan_repo, repo, profile, req, planned.ctx)
        # Validated with flash attention as served, then without it, then the repo's next
        # file up (output_for)
        plan, out = output_for(
            planned, forced=is_forced, outputs=outputs, failures=failures, make=make,
            replan=replan, step_up_skip=partial(step_up_skip, "gguf", profile=profile),
            log=log, ladder=step_up_ladder(repo, planned))
        assert pulled is not None
        _write(req, repo, pulled, plan, _choice_of(repo, plan), out, name, profile, result,
               packs, log)
    for p in packs.values():
        p.cleanup()
    return result


def _with_reference(c: FileChoice, ref: FileChoice | None) -> list[str]:
    """The files of ``c`` and of its reference ``ref``, if any."""
    return [*c.files, *(ref.files if ref is not None else ())]


def _replan_repo(repo: GgufRepo, profile: DeviceProfile, req: BuildRequest, ctx: int,
                 quant: str, planned: str | None, *, flash_attn: bool = True) -> Plan:
    """The plan for the repo's ``quant`` file again, at the planned context (output_for)."""
    from edgepack.device.catalog import list_profiles

    return plan_gguf_repo(repo, profile, fmt=req.fmt, ctx=ctx, quant=quant,
                          min_tokens_per_second=req.min_tokens_per_second,
                          alternatives=list_profiles(), parallel=req.parallel,
                          flash_attn=flash_attn, step_up_from=planned)


def _kind(repo: GgufRepo, c: FileChoice) -> str:
    if c.facts.family == "encoder":
        return "embedding"
    return "chat" if "tokenizer.chat_template" in repo.headers[c.path].metadata else "completion"


def _threshold_quant(c: FileChoice) -> str:
    """A quant name validate_gguf has thresholds for: the file's own, else the known type of
    nearest quality."""
    from edgepack.build.gguf_validate import THRESHOLDS
    from edgepack.plan.quants import FILE_TYPES

    if c.quant in THRESHOLDS:
        return c.quant
    return min(FILE_TYPES, key=lambda ft: abs(ft.kld - c.kld)).name


def _validate(req: BuildRequest, repo: GgufRepo, folder: Path, c: FileChoice,
              ref: FileChoice | None, why_ref: str, flash_attn: bool,
              log: Callable[[str], None]) -> dict[str, Any]:
    from edgepack.build.gguf_validate import (
        DEFAULT_GOLDEN,
        GoldenPrompt,
        validate_gguf,
    )
    from edgepack.build.request import build_stage

    kind = _kind(repo, c)
    threads = req.threads or os.cpu_count() or 1
    if req.golden is None:
        golden = DEFAULT_GOLDEN if kind == "chat" else ()
    else:
        golden = tuple(GoldenPrompt(g.prompt, g.expect) for g in req.golden)
    model = folder / c.path
    if ref is not None:
        with build_stage(log, "validate", f"validating {c.quant} against {ref.quant} of the repo"):
            val = validate_gguf(model, folder / ref.path, _threshold_quant(c), golden=golden,
                                min_agreement=req.min_agreement, max_kl=req.max_kl,
                                min_cosine=req.min_cosine, threads=threads,
                                flash_attn=flash_attn)
        validation = {"metric": val.metric, "value": val.value, "threshold": val.threshold,
                      "passed": val.passed, "reference": ref.path,
                      "details": {**val.details, "reference_why": why_ref}}
    else:
        with build_stage(log, "validate", f"answering golden prompts with {c.quant}"):
            validation = golden_only(model, golden, threads, why_ref, kind, flash_attn)
    return {"kind": kind, "validation": validation,
            "golden": tuple({"prompt": g.prompt, "expect": g.expect} for g in golden)}


def golden_only(model: Path, golden: Sequence[Any], threads: int, why: str,
                kind: str, flash_attn: bool = False) -> dict[str, Any]:
    """Validation without a reference file: the golden prompts must all pass (ValidationFailed
    otherwise); with no golden prompts, loading the file and one greedy token is the check.

    The context is sized as for a checkpoint build (:func:`validation_ctx`: the texts counted
    with the file's own tokenizer, capped at its trained context), never a fixed size."""
    import gc

    from edgepack.build.gguf_validate import answer_golden, load_model, validation_ctx

    n_ctx = validation_ctx(model, tuple(golden))
    llm = load_model(model, threads, n_ctx, flash_attn=flash_attn and kind != "embedding")
    try:
        if kind == "embedding":
            llm.close()
            llm = load_model(model, threads, n_ctx, embedding=True)
            llm.embed("edgepack")
            answers: list[dict[str, Any]] = []
        else:
            answers = [answer_golden(llm, g) for g in golden]
            llm.reset()
            llm.eval(llm.tokenize(b"Hello", add_bos=True))
    finally:
        llm.close()
        del llm
        gc.collect()
    failed = [a for a in answers if not a["passed"]]
    if failed:
        a = failed[0]
        summary = (f"golden prompt {a['prompt']!r} answered {a['answer']!r} without "
                   f"{a['expect']!r}")
        raise ValidationFailed(
            f"{model.name} failed its golden prompt {a['prompt']!r}: answered {a['answer']!r} "
            f"without {a['expect']!r}", checks=("golden",), summary=summary,
            hint="pick a higher-precision file with --quant, or change the prompts with "
                 "--golden / skip them with --no-golden")
    return {"metric": "golden_prompts" if answers else "loads",
            "value": float(len(answers) - len(failed)) if answers else 1.0,
            "threshold": float(len(answers)) if answers else 1.0, "passed": True,
            "reference": None,
            "details": {"golden": answers, "reference_why": why, "n_ctx": n_ctx,
                        "flash_attn": flash_attn}}


def _write(req: BuildRequest, repo: GgufRepo, pulled: Any, plan: Plan, c: FileChoice,
           out: dict[str, Any], name: str, profile: DeviceProfile, result: BuildResult,
           packs: dict[tuple[Any, ...], Any], log: Callable[[str], None]) -> None:
    from edgepack.build.gguf_convert import installed_llama_cpp_python
    from edgepack.build.outputs import LLAMA_ENGINE_RANGE
    from edgepack.build.pipeline import (
        emit_bundle,
        plan_systemd_units,
        runtime_pack_for,
        server_tables,
    )
    from edgepack.bundle import BundleSpec
    from edgepack.device.profile import profile_digest

    folder = pulled.folder
    source = {
        "ref": repo.ref.text,
        "repo_id": repo.repo_id,
        "revision": repo.sha,
        "requested_revision": None if repo.ref.is_local else repo.ref.revision,
        "content_digest": None,
        "files": dict(sorted((p, pulled.files[p]) for p in c.files)),
    }
    validation = out["validation"]
    ref_path = validation.get("reference")
    if ref_path:
        ref_choice = next(x for x in repo.choices if x.path == ref_path)
        source["validation_reference"] = {p: pulled.files[p] for p in ref_choice.files}
    engine_version = installed_llama_cpp_python()
    engine = {"name": "llama.cpp", "package": "llama-cpp-python",
              "version_range": LLAMA_ENGINE_RANGE, "built_with": engine_version}
    details = {"gguf_repo": {
        "chosen": c.path, "files": list(c.files), "quant": c.quant,
        "why": list(plan.rationale), "quality_basis": c.kld_basis,
        "reference": ref_path, "reference_why": validation["details"].get("reference_why"),
        "header_bytes_read": repo.header_bytes_read,
        "candidates": [{"path": x.path, "quant": x.quant, "parts": len(x.files),
                        "size_bytes": file_size(repo, x),
                        "weights_bytes": sum(_nbytes(t) for t in x.facts.tensors),
                        "kld": x.kld} for x in repo.choices],
    }, "tensor_types": plan.estimate.tensor_types}
    card = repo.card
    bundle_name = f"{name}-{profile.id}"
    staged = [_staged(folder / p, pulled.files[p]) for p in c.files]
    model_file = staged[0]
    kind = out["kind"]
    pack = runtime_pack_for(req, profile, "gguf", packs, log) if req.runtime else None
    spec = BundleSpec(
        name=bundle_name, version=req.bundle_version, model_file=model_file,
        model_name=name, model_format="gguf", model_kind=kind, quant=c.quant,
        plan=plan.to_dict(),
        server=server_tables(plan, f"model/{model_file.name}", kind, name, profile),
        source=source,
        device={"profile_id": profile.id, "profile_digest": profile_digest(profile)},
        engine=engine, validation=validation,
        extra_model_files=tuple(staged[1:]),
        golden_prompts=out["golden"], model_details=details,
        converter={"name": "none: the repo's GGUF file, unchanged", "version": None},
        systemd_units=plan_systemd_units(plan), card=card.to_dict(),
        derivation={
            "derived_from": f"{repo.repo_id or repo.ref.text}@{repo.sha}",
            "license": card.license, "license_name": card.license_name,
            "license_note": "the bundle ships the source repo's file unchanged, under its "
                            "licence; the licence texts are in license/",
            "changes": [f"none: {c.path} is shipped as published"],
        },
        license_files=tuple((f.path, f.local.resolve()) for f in card.license_files),
        runtime_files=pack.files if pack else {},
        runtime=pack.info if pack else None,
    )
    emit_bundle(req, spec, profile.id, result, log)
    result.notes.extend(pack.notes if pack else ())


def _staged(path: Path, sha256: str) -> Path:
    """``path`` (a hub-cache symlink to its blob) as a file of the same name that the bundle
    writer can hard-link: Linux link(2) would link the symlink itself, not the blob."""
    from edgepack.build.request import cache_root

    dst = cache_root() / "gguf-repo" / sha256[:16] / path.name
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(path.resolve(), tmp)
        except OSError:
            import shutil

            shutil.copyfile(path, tmp)
        os.replace(tmp, dst)
    return dst


def _nbytes(t: Any) -> int:
    from edgepack.plan.gguf_header import GgufTensorInfo

    return GgufTensorInfo(t.gguf_name or t.name, t.gguf_shape, t.dtype).nbytes
