"""``edgepack build``, ``verify`` and ``inspect``.

``verify`` and ``inspect`` are device side (stdlib + edgepack.manifest); ``build`` imports the
build side only when it runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgepack.errors import UsageError


def _parse_golden(values: tuple[str, ...], none: bool):
    from edgepack.build.pipeline import Golden

    if none and values:
        raise UsageError("--golden and --no-golden exclude each other")
    if none:
        return ()
    if not values:
        return None
    out = []
    for v in values:
        prompt, sep, expect = v.partition("=>")
        if not sep or not prompt.strip() or not expect.strip():
            raise UsageError(
                f"--golden {v!r} is not 'PROMPT=>EXPECTED TEXT'",
                hint="for example --golden 'What is the capital of France?=>Paris'",
            )
        out.append(Golden(prompt.strip(), expect.strip()))
    return tuple(out)


def _parse_quants(values: tuple[str, ...]) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    default: str | None = None
    per_device: list[tuple[str, str]] = []
    for v in values:
        device, sep, quant = v.rpartition("=")
        if not sep:
            if default is not None:
                raise UsageError(
                    f"--quant given twice without a device ({default!r}, {v!r})",
                    hint="use --quant Q for all devices, or --quant DEVICE=Q for one",
                )
            default = v
        elif not device or not quant:
            raise UsageError(f"--quant {v!r} is not DEVICE=QUANT", hint="e.g. --quant pi=Q4_0")
        else:
            per_device.append((device, quant))
    return default, tuple(per_device)


@click.command("build")
@click.argument("model")
@click.option("--device", "devices", multiple=True, required=True,
              help="Device profile id, .toml path or 'local'; repeat for several devices "
              "(one pull and one intermediate serve them all).")
@click.option("--format", "fmt", type=click.Choice(["auto", "gguf", "onnx"]), default="auto",
              show_default=True, help="Output format; auto: encoders ONNX, decoders GGUF.")
@click.option("--quant", "quants", multiple=True, metavar="[DEVICE=]QUANT",
              help="Force a quantization for every device (Q4_0) or for one "
              "(raspberry-pi-5-8gb=Q4_0); default: the plan's choice, stepped up to the next "
              "precision that fits when it fails validation (a forced one fails the build).")
@click.option("--ctx", type=click.IntRange(min=1), default=None, help="Context length in tokens.")
@click.option("--min-tokens-per-second", "min_tps", type=click.FloatRange(min=0.0), default=None,
              help="Decode speed floor for the plan (default: the device class's interactive "
              "floor, 5 tok/s; 0 turns it off).")
@click.option("--parallel", type=click.IntRange(min=1), default=None,
              help="Slots a GGUF chat/completion bundle decodes together (server.toml "
              "n_parallel; the plan's memory holds each slot's KV cache). Default: as many as "
              "fit, up to one per core and 4; refused (exit 5) when it does not fit.")
@click.option("--bundle-version", "version", default="1", show_default=True,
              help="Bundle version (integer or MAJOR.MINOR.PATCH); orders updates.")
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("bundles"), show_default=True,
              help="Directory that receives one bundle folder per device.")
@click.option("--name", default=None, help="Model name served by /v1/models (default: repo name).")
@click.option("--token", default=None, envvar="HF_TOKEN", show_envvar=True,
              help="Hugging Face token for gated or private models.")
@click.option("--golden", "golden", multiple=True, metavar="'PROMPT=>EXPECTED'",
              help="A golden prompt whose greedy answer must contain EXPECTED (repeatable; "
              "default for chat models: the capital of France).")
@click.option("--no-golden", is_flag=True, help="Skip golden prompts (e.g. random test models).")
@click.option("--min-agreement", type=float, default=None,
              help="Lower the top-token agreement threshold explicitly.")
@click.option("--max-kl", type=float, default=None, help="Raise the KL threshold explicitly.")
@click.option("--min-cosine", type=float, default=None,
              help="Lower the embedding cosine threshold explicitly.")
@click.option("--runtime", is_flag=True,
              help="Add runtime/ to each bundle: wheels for the device's platform (edgepack, "
              "its engine, llama-cpp-python compiled for its CPU) and install.sh, for an "
              "offline install (needs PyPI and, for GGUF, gcc-aarch64-linux-gnu here).")
@click.option("--archive", is_flag=True, help="Also write one .tar per bundle for offline copy.")
@click.option("--overwrite", is_flag=True, help="Replace existing bundle folders.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads for quantization and validation (default: all CPUs).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as one JSON object (schema: docs/json.md#build).")
@click.option("--allow-license", "allow_licenses", multiple=True, metavar="LIST",
              envvar="EDGEPACK_ALLOW_LICENSE", show_envvar=True,
              help="Licences the model may have, by model-card id (apache-2.0,mit; for "
              "'license: other' its license_name); checked before any weight byte, exit 3 "
              "when refused. Comma-separated or repeated; @FILE reads a policy file (one id a "
              "line).")
def build(model, devices, fmt, quants, ctx, min_tps, parallel, version, out, name, token, golden,
          no_golden, min_agreement, max_kl, min_cosine, runtime, archive, overwrite, threads,
          as_json, allow_licenses) -> None:
    """Pull MODEL (org/name[@rev] or a folder), plan, convert, validate and bundle it."""
    from edgepack.build.pipeline import BuildRequest, parse_version_option, run_build

    quant, per_device = _parse_quants(quants)
    req = BuildRequest(
        model=model, devices=tuple(devices), fmt=fmt, quant=quant,
        device_quants=per_device, ctx=ctx, out=out,
        bundle_version=parse_version_option(version), name=name, token=token,
        golden=_parse_golden(golden, no_golden), min_agreement=min_agreement, max_kl=max_kl,
        min_cosine=min_cosine, archive=archive, overwrite=overwrite, threads=threads,
        allow_licenses=tuple(allow_licenses), min_tokens_per_second=min_tps,
        runtime=runtime, parallel=parallel,
    )
    from edgepack.cli.progress import StageReporter, hub_progress_bars

    reporter = StageReporter()
    with hub_progress_bars(reporter):
        result = run_build(req, log=reporter)
    if as_json:
        from edgepack.cli.output import echo_json

        echo_json({"schema": 1, "bundles": [b.to_dict() for b in result.summaries],
                   "notes": result.notes})
        return
    _render_summary(result)


def _render_summary(result) -> None:
    """A table per bundle (device, format, quant, size, validation, path) and what to run next."""
    from rich.table import Table

    from edgepack.cli.output import console

    table = Table(box=None, header_style="bold", title="built", title_justify="left")
    for column in ("device", "format", "quant", "size", "validation"):
        table.add_column(column, no_wrap=True)
    table.add_column("path", overflow="fold")
    for b in result.summaries:
        v = b.validation
        value = v.get("value")
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        verdict = "passed" if v.get("passed") else "FAILED"
        table.add_row(b.device, b.format, b.quant, f"{b.size_bytes / 2**20:,.1f} MiB",
                      f"{v.get('metric')} {shown} {verdict}",
                      str(b.path) + (f"\n{b.archive}" if b.archive else ""))
    console().print(table)
    # Plain echo, never wrapped: the commands must stay copyable at any width.
    for note in result.notes:
        click.echo(f"note: {note}")
    if result.summaries:
        first = result.summaries[0].path
        click.echo(f"next: edgepack chat {first}")
        click.echo(f"      edgepack serve {first}")


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", "keys", multiple=True, type=click.Path(path_type=Path),
              help="Trusted ed25519 public key (PEM, from `edgepack keygen`); with it the "
              "bundle must also carry a valid signature (provenance.intoto.jsonl) over its "
              "manifest. Repeat to trust several keys.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as JSON (schema: docs/schemas/verify.json); a failed "
              "check is still an error (exit 6) on stderr.")
def verify(bundle: Path, keys: tuple[Path, ...], as_json: bool) -> None:
    """Check every file of BUNDLE (a folder or its .tar) against its manifest (exit 6 naming
    each bad file); with --key, check its signature too, offline (exit 6 naming what failed)."""
    from edgepack.archive import extract_archive, is_archive, scan_archive, verify_archive

    if keys:
        import tempfile

        from edgepack.signature import verify_signed_bundle

        with tempfile.TemporaryDirectory(prefix="edgepack-verify-") as tmp:
            folder = (extract_archive(scan_archive(bundle), Path(tmp) / "bundle")
                      if is_archive(bundle) else bundle)
            signed = verify_signed_bundle(folder, keys)
        if as_json:
            _verified(bundle, len(signed.manifest["files"]),
                      {"keyid": signed.keyid, "key_source": signed.key_source})
            return
        click.echo(f"ok: signature by key {signed.keyid[:16]}… ({signed.key_source}) covers "
                   f"manifest.json and its {len(signed.manifest['files'])} files, which match")
        return
    from edgepack.manifest import verify_bundle

    if is_archive(bundle):
        manifest = verify_archive(scan_archive(bundle))
        if as_json:
            _verified(bundle, len(manifest["files"]), None)
            return
        click.echo(f"ok: {len(manifest['files'])} files in {bundle} match its manifest")
        return
    manifest = verify_bundle(bundle)
    if as_json:
        _verified(bundle, len(manifest["files"]), None)
        return
    click.echo(f"ok: {len(manifest['files'])} files match {bundle / 'manifest.json'}")


def _verified(bundle: Path, files: int, signature: dict | None) -> None:
    from edgepack.cli.output import echo_json

    echo_json({"schema": 1, "bundle": str(bundle), "ok": True, "files": files,
               "signature": signature})


@click.command("inspect")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
@click.option("--sbom", "as_sbom", is_flag=True,
              help="Print the bundle's ML-BOM (sbom.cdx.json, CycloneDX 1.6) as it is.")
def inspect(bundle: Path, as_json: bool, as_sbom: bool) -> None:
    """Show what BUNDLE (a folder or its .tar) holds: model, licence, source, device, plan,
    validation, runtime pack."""
    from edgepack.archive import is_archive, read_archive_manifest, scan_archive
    from edgepack.manifest import load_manifest

    m = read_archive_manifest(scan_archive(bundle)) if is_archive(bundle) else load_manifest(bundle)
    if as_sbom:
        if is_archive(bundle):
            raise UsageError("--sbom reads a bundle folder, not an archive",
                             hint=f"unpack it first (edgepack install, or tar -xf {bundle})")
        click.echo(_sbom_text(bundle, m), nl=False)
        return
    if as_json:
        click.echo(json.dumps(m, indent=2, sort_keys=True))
        return
    model, plan, val = m.get("model", {}), m.get("plan", {}), m.get("validation", {})
    mem = plan.get("memory", {})
    src = m.get("source", {})
    lines = [
        f"bundle      {m['bundle']['name']} version {m['bundle']['version']}",
        f"model       {model.get('name')} ({model.get('kind')}) {model.get('format')} "
        f"{model.get('quant')}, {model.get('size', 0) / 2**20:.1f} MiB",
        f"source      {src.get('repo_id') or src.get('ref')} @ "
        f"{src.get('revision') or src.get('content_digest')}",
        f"device      {m.get('device', {}).get('profile_id')}",
        f"plan        ctx {plan.get('ctx')}, threads {plan.get('threads')}, "
        f"gpu layers {plan.get('gpu_layers')}, "
        f"{'flash attention, ' if plan.get('flash_attn') else ''}memory "
        f"{mem.get('required_bytes', 0) / 2**20:.0f} MiB of "
        f"{mem.get('usable_bytes', 0) / 2**20:.0f} MiB usable",
        f"speed       ~{(plan.get('speed') or {}).get('decode_tokens_per_second') or 0:.1f} "
        "tok/s decode (estimate)",
        f"validation  {val.get('metric')} = {val.get('value')} "
        f"(threshold {val.get('threshold')}, {'passed' if val.get('passed') else 'FAILED'})",
        *_step_up_lines(plan),
        f"engine      {m.get('engine', {}).get('name')} "
        f"{m.get('engine', {}).get('version_range')}",
        *_card_lines(m),
        f"files       {len(m['files'])}, edgepack {m.get('edgepack_version')}",
        f"runtime     {_runtime_line(m.get('runtime'))}",
    ]
    click.echo("\n".join(lines))


def _step_up_lines(plan: dict) -> list[str]:
    """Why the bundle is not the planner's choice: each quant (or kernels) the build tried
    before it."""
    lines = []
    for a in plan.get("step_up") or []:
        failed = f"({', '.join(a.get('failed') or [])}): {a.get('message')}"
        if a.get("quant") == plan.get("quant") and a.get("flash_attn"):
            # the same quant validated again without flash attention (build/step_up.py)
            lines.append(f"kernels     without flash attention: with it {failed}")
        else:
            lines.append(f"stepped up  from {a.get('quant')}"
                         f"{' with flash attention' if a.get('flash_attn') else ''} {failed}")
    return lines


def _card_lines(m: dict) -> list[str]:
    """Licence and lineage lines of ``inspect`` (bundles from before the card have none)."""
    card, derivation = m.get("card"), m.get("derivation") or {}
    if not isinstance(card, dict):
        return ["licence     not recorded (bundle built before edgepack read model cards)"]
    lic = card.get("license") or "unknown (the model card declares none)"
    if lic == "other" and card.get("license_name"):
        lic = f"other ({card['license_name']})"
    texts = ", ".join(f["path"] for f in card.get("license_files") or []) or "none in the repo"
    lines = [f"licence     {lic}" + (f", {card['license_link']}" if card.get("license_link")
                                     else "") + f"; texts: {texts}"]
    if card.get("gated"):
        lines.append(f"gated       yes ({card['gated']}): the source needs accepted terms")
    for label, key in (("base model", "base_model"), ("datasets", "datasets"),
                       ("language", "language")):
        if card.get(key):
            lines.append(f"{label:<11} {', '.join(card[key])}")
    if card.get("pipeline_tag"):
        lines.append(f"task        {card['pipeline_tag']}")
    for change in derivation.get("changes") or []:
        lines.append(f"changed     {change}")
    return lines


def _sbom_text(bundle: Path, manifest: dict) -> str:
    """sbom.cdx.json, checked against its manifest entry before it is shown."""
    from edgepack.errors import IntegrityError
    from edgepack.manifest import sha256_file

    entry = next((f for f in manifest["files"] if f["path"] == "sbom.cdx.json"), None)
    path = bundle / "sbom.cdx.json"
    if entry is None:
        raise UsageError(f"bundle {str(bundle)!r} has no sbom.cdx.json",
                         hint="it was built before edgepack wrote ML-BOMs; rebuild it")
    if not path.is_file() or sha256_file(path) != entry["sha256"]:
        raise IntegrityError(f"{path} does not match its manifest entry",
                             hint="the bundle was altered; run `edgepack verify` on it")
    return path.read_text(encoding="utf-8")


def _runtime_line(runtime: dict | None) -> str:
    """The runtime pack in one line, and its CPU-only warning on a line of its own."""
    if not runtime:
        return "none (edgepack must be on the device already; build --runtime for a pack)"
    text = (f"{runtime.get('os')} {runtime.get('arch')} CPython {runtime.get('python')}, "
            f"{len(runtime.get('wheels', []))} wheels, sh install.sh")
    if runtime.get("llama_cpp_python"):
        text += f", llama.cpp built for {runtime.get('target_cpu')}"
    if runtime.get("warning"):
        text += f"\n  !!  {runtime['warning']}"
    return text
