"""Structured output: OpenAI's ``response_format`` and llama.cpp's ``grammar`` as one GBNF grammar.

The grammar constrains sampling token by token (llama.cpp's grammar sampler), so the answer
parses as JSON, or matches the JSON schema, by construction rather than by hoping the model
complies. JSON schemas are compiled with llama-cpp-python's port of llama.cpp's
``json_schema_to_grammar`` (``llama_cpp.llama_grammar.SchemaConverter``), the converter
llama-server uses for the same field; it is imported only when a request needs it, so the
server imports on devices without llama.cpp (ONNX engine).

Device side: standard library plus llama_cpp at call time.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Bounds on what a client may ask the grammar engine to compile (a schema or grammar is
# compiled per request, on the request's thread, and a huge one would hold that thread).
MAX_GRAMMAR_CHARS = 64 * 1024
MAX_SCHEMA_CHARS = 64 * 1024


@dataclass(frozen=True)
class Structure:
    """What the answer must look like: ``kind`` json_object | json_schema | grammar."""

    kind: str
    param: str  # the request field it came from, for error messages
    schema: Mapping[str, Any] | None = None
    grammar: str | None = None
    name: str = ""


def compile_schema(schema: Mapping[str, Any], rule: str = "") -> str:
    """GBNF rules for ``schema``; the top rule is ``root`` (or ``rule`` when given).

    Raises ValueError naming what the converter could not handle.
    """
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False,
                                raw_pattern=False)
    try:
        resolved = converter.resolve_refs(json.loads(json.dumps(schema)), "request")
        converter.visit(resolved, rule)
        return str(converter.format_grammar())
    except AssertionError as e:  # the converter asserts on remote $ref
        raise ValueError(f"the JSON schema cannot be compiled: {e}") from e
    except (ValueError, KeyError, TypeError, NotImplementedError, IndexError,
            RecursionError) as e:
        raise ValueError(
            f"the JSON schema cannot be compiled to a grammar ({type(e).__name__}: {e}); "
            "use the JSON Schema subset llama.cpp supports (objects, arrays, enums, const, "
            "anyOf/oneOf, local $ref, string patterns and formats)"
        ) from e


def grammar_for(structure: Structure) -> str:
    """The GBNF grammar that enforces ``structure``; ValueError when it cannot be built."""
    if structure.kind == "grammar":
        assert structure.grammar is not None
        return structure.grammar
    if structure.kind == "json_object":
        # Any JSON object, as OpenAI's json_object mode promises; the converter's grammar
        # bounds whitespace, so a model cannot wander off emitting blanks forever.
        return compile_schema(structure.schema or {"type": "object"})
    if structure.kind == "json_schema":
        assert structure.schema is not None
        return compile_schema(structure.schema)
    raise ValueError(f"unknown structure kind {structure.kind!r}")


def parse_response_format(value: Any, grammar: Any) -> Structure | None:
    """Validate ``response_format`` and the ``grammar`` extension; at most one may constrain.

    Raises ValueError(param, message) pairs as ``FormatError``.
    """
    structure: Structure | None = None
    if value is not None:
        if not isinstance(value, dict):
            raise FormatError("response_format", "'response_format' must be an object such as "
                              '{"type": "json_object"}')
        kind = value.get("type")
        if kind == "text":
            structure = None
        elif kind == "json_object":
            # llama-server also reads a "schema" here; accept it the same way.
            schema = value.get("schema")
            if schema is not None and not isinstance(schema, dict):
                raise FormatError("response_format.schema", "'response_format.schema' must be "
                                  "a JSON schema object")
            structure = Structure("json_object", "response_format", schema=schema)
        elif kind == "json_schema":
            spec = value.get("json_schema")
            if not isinstance(spec, dict):
                raise FormatError("response_format.json_schema",
                                  "'response_format.json_schema' must be an object with "
                                  "'name' and 'schema'")
            schema = spec.get("schema", {"type": "object"})
            if not isinstance(schema, dict):
                raise FormatError("response_format.json_schema.schema",
                                  "'response_format.json_schema.schema' must be a JSON schema "
                                  "object")
            name = spec.get("name", "")
            if not isinstance(name, str):
                raise FormatError("response_format.json_schema.name",
                                  "'response_format.json_schema.name' must be a string")
            if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
                raise FormatError("response_format.json_schema.schema",
                                  f"the JSON schema is longer than {MAX_SCHEMA_CHARS} "
                                  "characters")
            # strict or not, the schema is enforced: a grammar cannot half-apply.
            structure = Structure("json_schema", "response_format", schema=schema, name=name)
        else:
            raise FormatError("response_format.type",
                              f"'response_format.type' must be one of text, json_object, "
                              f"json_schema, got {kind!r}")
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise FormatError("grammar", "'grammar' must be a non-empty GBNF grammar string")
        if len(grammar) > MAX_GRAMMAR_CHARS:
            raise FormatError("grammar", f"'grammar' is {len(grammar)} characters, at most "
                              f"{MAX_GRAMMAR_CHARS} allowed")
        if structure is not None:
            raise FormatError("grammar", "send either 'grammar' or a JSON 'response_format', "
                              "not both")
        structure = Structure("grammar", "grammar", grammar=grammar)
    return structure


class FormatError(ValueError):
    """A bad ``response_format`` or ``grammar``; ``param`` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
