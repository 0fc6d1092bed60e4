"""Check a command's ``--json`` output against its documented schema (docs/schemas/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"


def check_json(name: str, text: str) -> Any:
    """Parse ``text`` and validate it against docs/schemas/NAME.json; return the data."""
    data = json.loads(text)
    schema = json.loads((SCHEMAS / f"{name}.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(data, schema, cls=jsonschema.Draft202012Validator)
    return data
