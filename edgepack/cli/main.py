"""The edgepack command line: parse, call, render.

Commands import their implementation lazily, so ``edgepack serve`` and ``edgepack agent`` run
on a device that has only the device extras installed (no torch, transformers, optimum or
huggingface_hub).
"""

from __future__ import annotations

import os
import traceback
from typing import IO, Any

import click

from edgepack import __version__
from edgepack.cli.output import verbosity_options
from edgepack.errors import EXIT_INTERNAL, EdgepackError


def _debug() -> bool:
    return os.environ.get("EDGEPACK_DEBUG", "") not in ("", "0")


class _ReportedError(click.ClickException):
    """An error turned into a one-paragraph message and an exit code (README, "Exit codes")."""

    def __init__(self, text: str, exit_code: int, cause: BaseException) -> None:
        super().__init__(text)
        self.cause = cause
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it per instance

    def show(self, file: IO[Any] | None = None) -> None:
        if _debug():
            traceback.print_exception(type(self.cause), self.cause, self.cause.__traceback__)
        click.echo(f"error: {self.message}", err=True)


def _add_verbosity(command: click.Command) -> None:
    """Give ``command`` (and, for a group, its subcommands) the -q/-v options."""
    names = {opt for p in command.params for opt in getattr(p, "opts", ())}
    # A command that defines its own -v (agent run: debug lines in its log) keeps it.
    command.params.extend(o for o in verbosity_options() if not set(o.opts) & names)
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _add_verbosity(sub)


class EdgepackGroup(click.Group):
    """A click group that maps edgepack's error tree to exit codes and clear messages.

    Every command added to it gets ``-q``/``-v`` (edgepack.cli.output), so the convention holds
    for commands written later without each one declaring it.
    """

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        _add_verbosity(cmd)
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except EdgepackError as e:
            raise _ReportedError(e.render(), e.exit_code, e) from e
        except KeyboardInterrupt:
            raise click.exceptions.Abort() from None
        except Exception as e:  # noqa: BLE001 - never a bare traceback by default
            text = (
                f"internal error: {type(e).__name__}: {e}\n"
                "  hint: this is a bug in edgepack; rerun with EDGEPACK_DEBUG=1 and report "
                "the traceback."
            )
            raise _ReportedError(text, EXIT_INTERNAL, e) from e


@click.group(
    cls=EdgepackGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", prog_name="edgepack")
@click.option("-q", "--quiet", count=True, expose_value=False, is_eager=True,
              callback=verbosity_options()[0].callback,
              help="Print only results and errors, for every command.")
@click.option("-v", "--verbose", count=True, expose_value=False, is_eager=True,
              callback=verbosity_options()[1].callback, help="Print more detail (repeatable).")
def cli() -> None:
    """Build, serve and update models on edge devices.

    Exit codes: 0 ok, 1 internal error, 2 usage, 3 config/profile, 4 fetch/network,
    5 build or conversion, 6 integrity/signature, 7 runtime/health.
    Set EDGEPACK_DEBUG=1 to see tracebacks.
    """


def _register() -> None:
    # Each module only defines click commands; heavy imports happen inside the commands.
    from edgepack.cli.profiles import profiles

    cli.add_command(profiles)
    from edgepack.cli.plan import plan

    cli.add_command(plan)
    from edgepack.cli.build import build, inspect, verify

    for command in (build, verify, inspect):
        cli.add_command(command)
    from edgepack.cli.sign import keygen, sign

    for command in (sign, keygen):
        cli.add_command(command)
    from edgepack.cli.serve import serve

    cli.add_command(serve)
    from edgepack.cli.install import install

    cli.add_command(install)
    from edgepack.cli.chat import chat

    cli.add_command(chat)
    from edgepack.cli.cache import COMMANDS as inventory_commands

    for command in inventory_commands:
        cli.add_command(command)
    from edgepack.cli.ota import COMMANDS as ota_commands

    for command in ota_commands:
        cli.add_command(command)
    from edgepack.cli.fleet import COMMANDS as fleet_commands

    for command in fleet_commands:
        cli.add_command(command)


_register()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="edgepack")


if __name__ == "__main__":  # pragma: no cover
    main()
