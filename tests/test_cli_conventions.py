"""CLI conventions every command keeps: -q/-v anywhere, output within the terminal width."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from edgepack.cli.main import cli


def _walk(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _walk(command, (*prefix, name))


def test_every_command_takes_quiet_and_verbose():
    missing = [" ".join(path) for path, command in _walk(cli)
               if not {"-q", "-v"} <= {o for p in command.params for o in getattr(p, "opts", ())}]
    assert not missing, f"commands without -q/-v: {missing}"


@pytest.mark.parametrize("args", [["-q", "profiles", "list"], ["profiles", "list", "-q"],
                                  ["-v", "profiles", "list", "-v"]])
def test_quiet_and_verbose_work_before_or_after_the_command(args):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "raspberry-pi-5-8gb" in r.output


def test_verbose_adds_detail():
    plain = CliRunner().invoke(cli, ["profiles", "list"], env={"COLUMNS": "200"})
    wide = CliRunner().invoke(cli, ["profiles", "list", "-v"], env={"COLUMNS": "200"})
    assert "ISA" not in plain.output and "ISA" in wide.output


@pytest.mark.parametrize("columns", [60, 80, 132])
def test_profiles_list_fits_the_width_it_is_given(columns):
    r = CliRunner().invoke(cli, ["profiles", "list"], env={"COLUMNS": str(columns)})
    assert r.exit_code == 0, r.output
    assert max(len(line) for line in r.output.splitlines()) <= columns
    # ids never wrap: each is whole on some line, so grep finds it.
    assert any(line.split()[:1] == ["jetson-orin-nano-8gb"] for line in r.output.splitlines())


def test_plan_fits_eighty_columns_when_piped(tiny_llama_dir):
    r = CliRunner().invoke(cli, ["plan", str(tiny_llama_dir), "--device", "raspberry-pi-5-8gb"],
                           env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    assert max(len(line) for line in r.output.splitlines()) <= 80


def test_help_texts_have_no_printf_escapes_or_dangling_references():
    for path, command in _walk(cli):
        with click.Context(command, info_name=" ".join(path)) as ctx:
            text = command.get_help(ctx)
        assert "%%" not in text, f"{' '.join(path)} --help shows '%%'"
        assert "schema above" not in text, f"{' '.join(path)} --help points at nothing"
