"""``edgepack list``, ``edgepack rm`` and ``edgepack cache ls|prune``: what is built and
cached, with sizes (parse, call, render; the work is in :mod:`edgepack.inventory`).

JSON (``--json``; schemas in docs/schemas/): ``list`` → ``{"schema": 1, "folder", "bundles":
[...], "total_bytes"}``; ``cache ls`` → ``{"schema": 1, "root", "entries": [...],
"total_bytes"}``; ``rm`` and ``cache prune`` → ``{"schema": 1, "removed": [...],
"freed_bytes", "dry_run"}``.
"""

from __future__ import annotations

import time
from pathlib import Path

import click


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def _age(mtime: float) -> str:
    s = max(0.0, time.time() - mtime)
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= scale:
            return f"{s / scale:.0f}{unit} ago"
    return "just now"


@click.command("list")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path),
                default=Path("bundles"))
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (schema: docs/schemas/list.json).")
def list_command(folder: Path, as_json: bool) -> None:
    """List the bundles in FOLDER (default ./bundles, build's --out) with their sizes."""
    from rich.table import Table

    from edgepack.cli.output import console, echo_json
    from edgepack.inventory import list_bundles

    bundles = list_bundles(folder)
    total = sum(b.size_bytes for b in bundles)
    if as_json:
        echo_json({"schema": 1, "folder": str(folder), "total_bytes": total,
                   "bundles": [b.to_dict() for b in bundles]})
        return
    if not bundles:
        click.echo(f"no bundles in {folder}; make one with: edgepack build MODEL --device ID "
                   f"--out {folder}")
        return
    table = Table(box=None, header_style="bold")
    table.add_column("bundle", no_wrap=True)
    for column in ("version", "device", "format", "size", "valid", "built"):
        table.add_column(column, no_wrap=column != "device")
    for b in bundles:
        fmt = " ".join(x for x in (b.format, b.quant) if x) or "-"
        valid = "-" if b.validation_passed is None else ("yes" if b.validation_passed else "NO")
        name = b.path.name if b.complete else f"{b.path.name} (interrupted write)"
        table.add_row(name, str(b.version if b.version is not None else "-"), b.device or "-",
                      fmt, _size(b.size_bytes), valid, _age(b.modified))
    console().print(table)
    click.echo(f"{len(bundles)} in {folder}, {_size(total)}")


@click.command("rm")
@click.argument("bundles", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@click.option("--json", "as_json", is_flag=True,
              help="Print what was removed as JSON (schema: docs/schemas/removed.json).")
def rm_command(bundles: tuple[Path, ...], yes: bool, dry_run: bool, as_json: bool) -> None:
    """Remove bundle folders (only folders with a manifest.json, or interrupted writes)."""
    from edgepack.cli.output import echo_json, note
    from edgepack.errors import UsageError
    from edgepack.inventory import remove_bundle, tree_size

    for b in bundles:  # refuse before deleting anything
        if not (b / "manifest.json").is_file() and ".partial-" not in b.name:
            raise UsageError(f"{str(b)!r} has no manifest.json: not a bundle, so edgepack "
                             "will not delete it", hint="delete it yourself if you are sure")
    sizes = {b: tree_size(b) for b in bundles}
    if not (yes or dry_run or as_json):
        listing = ", ".join(f"{b} ({_size(s)})" for b, s in sizes.items())
        click.confirm(f"remove {listing}?", abort=True, err=True)
    freed = 0
    for b in bundles:
        if not dry_run:
            freed += remove_bundle(b)
        note(f"{'would remove' if dry_run else 'removed'} {b} ({_size(sizes[b])})")
    if as_json:
        echo_json({"schema": 1, "removed": [str(b) for b in bundles],
                   "freed_bytes": freed if not dry_run else sum(sizes.values()),
                   "dry_run": dry_run})


@click.group("cache")
def cache() -> None:
    """edgepack's build cache (converter, intermediates, quantized files, ONNX exports).

    Where: $EDGEPACK_CACHE, else $EDGEPACK_HOME/cache, else ~/.cache/edgepack/cache. Every
    entry is keyed by what it was made from, so removing one only costs time on the next
    build. Model downloads live in huggingface_hub's own cache (hf cache ls / delete).
    """


@cache.command("ls")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (schema: docs/schemas/cache-ls.json).")
def cache_ls(as_json: bool) -> None:
    """List the cache's entries with sizes and ages."""
    from rich.table import Table

    from edgepack.cli.output import console, echo_json
    from edgepack.inventory import cache_entries
    from edgepack.paths import cache_dir

    root = cache_dir()
    entries = cache_entries(root)
    total = sum(e.size_bytes for e in entries)
    if as_json:
        echo_json({"schema": 1, "root": str(root), "total_bytes": total,
                   "entries": [e.to_dict() for e in entries]})
        return
    if not entries:
        click.echo(f"the cache at {root} is empty")
        return
    table = Table(box=None, header_style="bold")
    table.add_column("section", no_wrap=True)
    table.add_column("size", no_wrap=True, justify="right")
    table.add_column("used", no_wrap=True)
    table.add_column("entry", overflow="fold")
    for e in entries:
        table.add_row(e.section, _size(e.size_bytes), _age(e.modified), e.path.name)
    console().print(table)
    click.echo(f"{len(entries)} entries in {root}, {_size(total)}")


@cache.command("prune")
@click.option("--older-than", "older_than", type=click.FloatRange(min=0), default=None,
              metavar="DAYS", help="Remove entries not written for DAYS days.")
@click.option("--section", "sections", multiple=True,
              help="Remove only entries of this section (repeatable): converter, "
              "intermediate, quantized, onnx, onnx-quantized.")
@click.option("--all", "everything", is_flag=True, help="Remove every entry.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@click.option("--json", "as_json", is_flag=True,
              help="Print what was removed as JSON (schema: docs/schemas/removed.json).")
def cache_prune(older_than: float | None, sections: tuple[str, ...], everything: bool,
                dry_run: bool, as_json: bool) -> None:
    """Remove cache entries by age or section (--all: everything)."""
    from edgepack.cli.output import echo_json, note
    from edgepack.inventory import cache_entries, prune, select_for_prune
    from edgepack.paths import cache_dir

    chosen = select_for_prune(cache_entries(cache_dir()), older_than_days=older_than,
                              sections=sections, everything=everything)
    size = sum(e.size_bytes for e in chosen)
    freed = size if dry_run else prune(chosen)
    for e in chosen:
        note(f"{'would remove' if dry_run else 'removed'} {e.section}/{e.path.name} "
             f"({_size(e.size_bytes)})")
    if as_json:
        echo_json({"schema": 1, "removed": [str(e.path) for e in chosen], "freed_bytes": freed,
                   "dry_run": dry_run})
    else:
        click.echo(f"{'would free' if dry_run else 'freed'} {_size(freed)} "
                   f"({len(chosen)} entries)")


COMMANDS = (list_command, rm_command, cache)
