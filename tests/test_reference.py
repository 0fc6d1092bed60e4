"""The README's reference (commands, environment, exit codes) and docs/reference.md are what
the CLI says: regenerate with `python -m edgepack.cli.reference --write` when this fails."""

from __future__ import annotations

import re
from pathlib import Path

from edgepack.cli import reference

ROOT = Path(__file__).resolve().parents[1]
FIX = "run `python -m edgepack.cli.reference --write` and commit the result"


def test_readme_reference_blocks_match_the_cli():
    text = reference.README.read_text(encoding="utf-8")
    for block in ("commands", "environment", "exit_codes"):
        assert f"<!-- reference:{block} -->" in text, f"README lost its {block} block"
    assert reference.render_readme(text) == text, f"README reference is stale: {FIX}"


def test_docs_reference_matches_every_commands_help():
    assert reference.REFERENCE.read_text(encoding="utf-8") == reference.reference_md(), (
        f"docs/reference.md is stale: {FIX}")


def test_every_environment_variable_the_code_reads_is_documented():
    used: set[str] = set()
    for folder in ("edgepack", "runtimes"):
        for f in (ROOT / folder).rglob("*.py"):
            used |= set(re.findall(r"\bEDGEPACK_[A-Z_]+\b", f.read_text(encoding="utf-8")))
    documented = set(reference.option_environment())
    for key in reference.OTHER_ENVIRONMENT:  # a row may name several: "A, B, C"
        documented |= {k.strip() for k in key.split(",")}
    missing = sorted(used - documented - set(reference.TEST_HOOKS))
    assert not missing, f"add {missing} to OTHER_ENVIRONMENT in edgepack/cli/reference.py"


def test_exit_codes_cover_every_error_class():
    from edgepack import errors

    table = reference.exit_codes_table()
    for name, value in vars(errors).items():
        if isinstance(value, type) and issubclass(value, errors.EdgepackError):
            assert f"`{name}`" in table
