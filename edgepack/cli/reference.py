"""The README's reference (commands, environment, exit codes) and docs/reference.md (every
command's --help), generated from the click commands themselves.

``python -m edgepack.cli.reference --write`` rewrites both; tests/test_reference.py fails when
what is checked in differs from what the CLI says, so the reference cannot drift.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import click

# Variables read outside click options (options' own variables are collected from the CLI).
OTHER_ENVIRONMENT = {
    "EDGEPACK_HOME": "edgepack's own folder (default `~/.cache/edgepack`): the embedded model, "
                     "and the build cache unless `EDGEPACK_CACHE` is set",
    "EDGEPACK_CACHE": "the build cache (default `$EDGEPACK_HOME/cache`): converter, "
                      "intermediates, quantized files, ONNX exports (`edgepack cache ls`)",
    "EDGEPACK_DEBUG": "`1`: print tracebacks with errors",
    "EDGEPACK_LLAMA_CPP_DIR": "a llama.cpp checkout whose `convert_hf_to_gguf.py` replaces the "
                              "one from the llama-cpp-python sdist",
    "EDGEPACK_MAX_ARCHIVE_BYTES": "the largest bundle `.tar` that `install`/`verify` unpack",
    "EDGEPACK_CONFIG": "device-local server overrides layered over `server.toml` (default "
                       "`/etc/edgepack/server.toml` when it exists)",
    "EDGEPACK_REPO_URL, EDGEPACK_CHANNEL, EDGEPACK_DEVICE_ID": "read from "
    "`/etc/edgepack/agent.env` by the agent's systemd unit and passed to `agent run` as "
    "`--repo-url`, `--channel`, `--device-id`",
    "EDGEPACK_WHEEL": "`build --runtime`: the edgepack wheel to put in the runtime pack "
                      "(default: built from this checkout)",
    "EDGEPACK_INSTALL_PROGRAMS": "`0`: `scripts/test` does not apt-get install the programs "
                                 "tests start; those tests skip",
    "HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE, HF_HOME": "huggingface_hub's own, honoured (read "
                                                      "at call time)",
}
# Read only by tests, never by a user's command.
TEST_HOOKS = ("EDGEPACK_AGENT_CRASH_AT", "EDGEPACK_TEST_HOOK_LOAD_DELAY_SECONDS")

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
REFERENCE = ROOT / "docs" / "reference.md"
_BLOCK = re.compile(r"(<!-- reference:(\w+) -->\n).*?(<!-- /reference:\2 -->)", re.S)


def walk(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, click.Command]]:
    """Every leaf command as ("repo gc", command), sorted."""
    for name in sorted(group.commands):
        command = group.commands[name]
        if isinstance(command, click.Group):
            yield from walk(command, (*prefix, name))
        else:
            yield " ".join((*prefix, name)), command


def _cli() -> click.Group:
    from edgepack.cli.main import cli

    return cli


def commands_table() -> str:
    rows = ["| command | what it does |", "|---|---|"]
    for path, command in walk(_cli()):
        ctx = click.Context(command)
        args = " ".join(
            p.human_readable_name if isinstance(p, click.Argument)
            else f"{p.opts[0]} {p.make_metavar(ctx)}"
            for p in command.params
            if isinstance(p, click.Argument) or (isinstance(p, click.Option) and p.required))
        summary = command.get_short_help_str(limit=200)
        rows.append(f"| `edgepack {path}{' ' + args if args else ''}` | {summary} |")
    return "\n".join(rows)


def option_environment() -> dict[str, list[str]]:
    """Environment variable → the options it sets (``serve --api-key``)."""
    out: dict[str, list[str]] = {}
    for path, command in walk(_cli()):
        for p in command.params:
            names = p.envvar if isinstance(p.envvar, (list, tuple)) else [p.envvar]
            for env in filter(None, names):
                out.setdefault(str(env), []).append(f"`{path} {p.opts[0]}`")
    return out


def environment_table() -> str:
    rows = ["| variable | meaning |", "|---|---|"]
    for env, options in sorted(option_environment().items()):
        extra = f"; {OTHER_ENVIRONMENT[env]}" if env in OTHER_ENVIRONMENT else ""
        rows.append(f"| `{env}` | same as {', '.join(options)}{extra} |")
    for env, text in OTHER_ENVIRONMENT.items():
        if env not in option_environment():
            rows.append(f"| `{env}` | {text} |")
    return "\n".join(rows)


def exit_codes_table() -> str:
    from edgepack import errors

    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.EdgepackError)]
    rows = ["| code | meaning | raised as |", "|---:|---|---|"]
    meaning = {
        0: "ok",
        1: "internal error (a bug: rerun with `EDGEPACK_DEBUG=1` and report the traceback)",
        2: "usage: a bad option or argument, an occupied output folder",
        3: "configuration or device profile (unknown id: the close matches are listed), "
           "a refused licence",
        4: "fetch/network: repo not found, gated, revision not found, hub unreachable",
        5: "build or conversion, including \"no quantization fits this device\" and failed "
           "validation",
        6: "integrity or signature: a bundle file does not match its manifest, untrusted "
           "metadata",
        7: "runtime or health: the engine cannot load, a server cannot be reached",
    }
    for code, text in meaning.items():
        names = sorted(c.__name__ for c in classes if c.exit_code == code)
        rows.append(f"| {code} | {text} | {', '.join(f'`{n}`' for n in names)} |")
    return "\n".join(rows)


def reference_md() -> str:
    parts = ["# Command reference", "",
             "Generated from the commands' own `--help` by `python -m edgepack.cli.reference "
             "--write`; `tests/test_reference.py` fails when this file is out of date.", ""]
    for path, command in walk(_cli()):
        # click (>= 8.1.8) caches a command's help option on first use, with whatever names
        # that context had; drop the cache for this rendering so the text never depends on
        # what ran before in the process, then put it back.
        cached = getattr(command, "_help_option", None)
        command._help_option = None  # type: ignore[attr-defined]
        try:
            with click.Context(command, info_name=f"edgepack {path}",
                               help_option_names=["-h", "--help"],
                               max_content_width=100, terminal_width=100) as ctx:
                text = command.get_help(ctx)
        finally:
            command._help_option = cached  # type: ignore[attr-defined]
        parts += [f"## edgepack {path}", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(parts)


def render_readme(text: str) -> str:
    """``text`` with every ``<!-- reference:NAME -->`` block regenerated."""
    blocks = {"commands": commands_table, "environment": environment_table,
              "exit_codes": exit_codes_table}

    def fill(m: re.Match[str]) -> str:
        return f"{m.group(1)}{blocks[m.group(2)]()}\n{m.group(3)}"

    return _BLOCK.sub(fill, text)


def main(argv: list[str]) -> int:
    readme = render_readme(README.read_text(encoding="utf-8"))
    ref = reference_md()
    if "--write" in argv:
        README.write_text(readme, encoding="utf-8")
        REFERENCE.parent.mkdir(exist_ok=True)
        REFERENCE.write_text(ref, encoding="utf-8")
        return 0
    sys.stdout.write(ref)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
