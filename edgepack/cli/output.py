"""How every command talks: verbosity (-q/-v), terminal-width rich output, JSON, progress.

Conventions (README "Output and scripting"):

- stdout carries the result (a table, a summary, or one JSON document with ``--json``);
  stderr carries progress and notes, so ``edgepack X --json | jq`` always parses.
- ``-q`` silences progress and notes (errors still print); ``-v`` adds details. Both work
  before or after the command name (``edgepack -q build ...`` = ``edgepack build -q ...``).
- Rich output follows the terminal width; piped, it follows ``COLUMNS`` or 80 columns, never a
  fixed width.
"""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console

_KEY = "edgepack.verbosity"


def _set_verbosity(ctx: click.Context, param: click.Parameter, value: int) -> None:
    if not value:
        return
    # Context.meta is shared by the whole context chain, so a flag given to the group and one
    # given to the command add up.
    delta = -value if param.name == "quiet" else value
    ctx.meta[_KEY] = ctx.meta.get(_KEY, 0) + delta


def verbosity_options() -> list[click.Option]:
    """Fresh ``-q``/``-v`` options (one set per command; click options cannot be shared)."""
    return [
        click.Option(["-q", "--quiet"], count=True, expose_value=False, is_eager=True,
                     callback=_set_verbosity,
                     help="Print only the result and errors (no progress or notes)."),
        click.Option(["-v", "--verbose"], count=True, expose_value=False, is_eager=True,
                     callback=_set_verbosity, help="Print more detail (repeatable)."),
    ]


def verbosity() -> int:
    """-1 or less: quiet; 0: normal; 1 or more: verbose. 0 outside a click command."""
    ctx = click.get_current_context(silent=True)
    return 0 if ctx is None else int(ctx.meta.get(_KEY, 0))


def note(message: str) -> None:
    """A progress or status line on stderr; silent with -q."""
    if verbosity() >= 0:
        click.echo(message, err=True)


def detail(message: str) -> None:
    """A detail line on stderr, shown only with -v."""
    if verbosity() >= 1:
        click.echo(message, err=True)


def console(stderr: bool = False) -> Console:
    """A rich console at the terminal's width (piped: COLUMNS or 80), colour only on a TTY."""
    return Console(stderr=stderr, soft_wrap=False, highlight=False)


def echo_json(data: Any) -> None:
    """One JSON document on stdout (indented, key order kept as built)."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))
