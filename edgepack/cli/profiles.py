"""``edgepack profiles``: list, show and detect device profiles (parse, call, render).

JSON output (``--json``), stable:

- ``list``: ``{"profiles": [PROFILE, ...]}`` sorted by id;
- ``show`` and ``detect``: ``PROFILE``;

where PROFILE is the profile's schema-1 data (see edgepack.device.profile) plus
``"derived": {"usable_gib", "effective_bandwidth_gbps", "bandwidth_basis", "decode_gflops",
"decode_gflops_range", "prompt_gflops", "prompt_gflops_range", "compute_basis", "digest"}``
(``decode_gflops``: llama.cpp's measured Q8_0 decode rate at ``cpu.cores`` threads, null when
the profile has no measurement; ``decode_gflops_range``: its [slowest, fastest] probe chunk,
null when not recorded; ``prompt_gflops`` and its range: the same for prompt evaluation).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import click

from edgepack.device.catalog import list_profiles
from edgepack.device.profile import (
    DeviceProfile,
    derived_figures,
    effective_bandwidth_gbps,
    flatten_profile,
    profile_to_toml,
)
from edgepack.device.resolve import load_profile
from edgepack.errors import UsageError


def _as_json(profile: DeviceProfile) -> dict[str, Any]:
    data = profile.to_dict()
    data["derived"] = derived_figures(profile)
    return data


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _accelerator_text(profile: DeviceProfile) -> str:
    acc = profile.accelerator
    if acc.kind == "none":
        return "none"
    return f"{acc.kind} {acc.compute_capability} ({acc.memory})"


def _render_details(profile: DeviceProfile) -> None:
    """Every field with its source, one per line (plain text: long URLs stay copyable)."""
    derived = derived_figures(profile)
    click.echo(f"{profile.id}: {profile.name}")
    click.echo(f"  digest: {derived['digest']}")
    click.echo(
        f"  usable memory: {derived['usable_gib']} GiB; planning bandwidth: "
        f"{derived['effective_bandwidth_gbps']} GB/s ({derived['bandwidth_basis']})"
    )
    if derived["decode_gflops"] is not None:
        spread = derived["decode_gflops_range"]
        chunks = "" if spread is None else f", chunks {spread[0]:g}-{spread[1]:g}"
        click.echo(f"  decode compute: {derived['decode_gflops']} GFLOPS at "
                   f"{profile.cpu.cores} threads{chunks} ({derived['compute_basis']})")
    else:
        click.echo(f"  decode compute: {derived['compute_basis']}")
    if derived["prompt_gflops"] is not None:
        spread = derived["prompt_gflops_range"]
        batches = "" if spread is None else f", batches {spread[0]:g}-{spread[1]:g}"
        click.echo(f"  prompt compute: {derived['prompt_gflops']} GFLOPS at "
                   f"{profile.cpu.cores} threads{batches} (measured: llama.cpp Q8_0 prompt)")
    for key, value in flatten_profile(profile).items():
        if key in ("schema", "id", "name"):
            continue
        shown = ", ".join(value) if isinstance(value, list) else value
        click.echo(f"  {key} = {shown}")
        source = profile.sources.get(key)
        if source:
            click.echo(f"      source: {source}")


@click.group("profiles")
def profiles() -> None:
    """Device profiles: what a target device offers, with a source for every figure."""


@profiles.command("list")
@click.option("--json", "as_json", is_flag=True, help='Print {"profiles": [...]} as JSON.')
def list_command(as_json: bool) -> None:
    """List the shipped device profiles."""
    items = list_profiles()
    if as_json:
        _echo_json({"profiles": [_as_json(p) for p in items]})
        return
    from rich.table import Table

    from edgepack.cli.output import console, verbosity

    # Compact, boxless columns so the table fits 80 columns (piped output): ids never wrap
    # and stay greppable; the ISA list (long) only with -v.
    wide = verbosity() >= 1
    title = "device profiles (RAM: total/usable; GB/s: m measured, t theoretical x 0.6)"
    table = Table(title=title, box=None, title_justify="left", header_style="bold")
    table.add_column("id", no_wrap=True, min_width=max(len(p.id) for p in items))
    for column in ("arch", "cores", "RAM GiB", "GB/s", "accel"):
        table.add_column(column, no_wrap=True)
    table.add_column("name", overflow="fold", ratio=1)
    if wide:
        table.add_column("ISA", overflow="fold")
    for p in items:
        basis = "m" if p.memory.measured_bandwidth_gbps is not None else "t"
        row = [
            p.id,
            p.cpu.arch,
            f"{p.cpu.cores}/{p.cpu.threads}",
            f"{p.memory.total_gib:g}/{p.memory.usable_gib:g}",
            f"{effective_bandwidth_gbps(p):.3g} {basis}",
            _accelerator_text(p) if wide else p.accelerator.kind,
            p.name,
        ]
        table.add_row(*row, *([" ".join(p.cpu.isa)] if wide else []))
    console().print(table)


@profiles.command("show")
@click.argument("ref", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
def show_command(ref: str, as_json: bool) -> None:
    """Show every figure of profile ID (a shipped id, a .toml path or 'local') with its source."""
    profile = load_profile(ref)
    if as_json:
        _echo_json(_as_json(profile))
    else:
        _render_details(profile)


def _save(profile: DeviceProfile, path: Path) -> DeviceProfile:
    """Write ``profile`` as TOML to ``path`` with id = the file stem; atomic replace."""
    if path.suffix != ".toml" or not re.match(r"^[a-z0-9][a-z0-9-]*$", path.stem):
        raise UsageError(
            f"cannot save the profile as '{path}': expected a file name like my-board.toml "
            "(lowercase letters, digits and '-', ending in .toml)",
            hint="the file name stem becomes the profile id, e.g. --save ./lab-pi5.toml",
        )
    from edgepack.device.detect import with_id

    profile = with_id(profile, path.stem)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".profile-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(profile_to_toml(profile))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return profile


@profiles.command("detect")
@click.option("--json", "as_json", is_flag=True, help="Print the detected profile as JSON.")
@click.option(
    "--measure",
    is_flag=True,
    help="Measure memory bandwidth (a bounded copy test, about 2 s) and llama.cpp's Q8_0 "
    "decode rate at 1 thread and all cores (a synthetic model, a few seconds; skipped, with "
    "the reason in its source, without the GGUF runtime).",
)
@click.option(
    "--measure-seconds",
    type=click.FloatRange(min=0.1, max=60.0),
    default=2.0,
    show_default=True,
    help="Time budget of --measure's bandwidth test.",
)
@click.option(
    "--save",
    "save_path",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Write the profile as TOML to FILE (usable as --device FILE).",
)
def detect_command(
    as_json: bool, measure: bool, measure_seconds: float, save_path: Path | None
) -> None:
    """Build a profile of this machine (memory, cores, ISA flags, board, bandwidth,
    OS/python/glibc)."""
    from edgepack.device.detect import detect_profile

    profile = detect_profile(measure=measure, seconds=measure_seconds)
    if save_path is not None:
        profile = _save(profile, save_path)
    if as_json:
        _echo_json(_as_json(profile))
    else:
        _render_details(profile)
    if save_path is not None:
        click.echo(f"saved to {save_path}; use it with --device {save_path}", err=as_json)
