"""Tool calls: which syntax a chat template speaks, the grammar that forces a call, the parser.

The model's own chat template renders ``tools`` and the tool-call history (engine side); this
module knows the text each template family makes the model write, the way llama.cpp's
``common/chat.cpp`` does (format chosen by markers in the template source,
https://github.com/ggml-org/llama.cpp/blob/master/common/chat.cpp):

- ``hermes`` (Qwen2.5, Qwen3, Hermes 2/3; template mentions ``<tool_call>``):
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block per call.
- ``llama3`` (Llama 3.1/3.2/3.3; template has the ``ipython`` role): one JSON object
  ``{"name": ..., "parameters": {...}}``, optionally after ``<|python_tag|>``.
- ``mistral`` (Mistral Nemo/Small; ``[TOOL_CALLS]``):
  ``[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": "abc123XYZ"}]``.

Pure Python; the grammar compiler is imported from structured.py at call time.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgepack.runtimes.structured import compile_schema

HERMES = "hermes"
LLAMA3 = "llama3"
MISTRAL = "mistral"
MAX_PARALLEL_CALLS = 8  # a forced-call grammar allows at most this many calls in one answer

_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_MISTRAL_MARK = "[TOOL_CALLS]"
_PYTHON_TAG = "<|python_tag|>"
_MISTRAL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def detect_tool_format(template: str | None) -> str | None:
    """The tool-call syntax of a chat template, or None when it has no tool support."""
    if not template or "tools" not in template:
        return None
    if _HERMES_OPEN in template:
        return HERMES
    if "<|start_header_id|>ipython<|end_header_id|>" in template or (
        "ipython" in template and "<|start_header_id|>" in template
    ):
        return LLAMA3
    if _MISTRAL_MARK in template:
        return MISTRAL
    return None


def new_call_id(fmt: str) -> str:
    # Mistral's templates reject ids that are not 9 alphanumerics.
    if fmt == MISTRAL:
        return uuid.uuid4().hex[:9]
    return "call_" + uuid.uuid4().hex[:24]


# -- forcing a call --------------------------------------------------------------------------


def forced_call_grammar(
    fmt: str, tools: Sequence[Mapping[str, Any]], name: str | None, parallel: bool
) -> str:
    """A GBNF grammar that admits only calls of ``tools`` (or of ``name``) in ``fmt`` syntax.

    Arguments follow each function's ``parameters`` schema. ValueError when a schema cannot
    be compiled.
    """
    args_key = "parameters" if fmt == LLAMA3 else "arguments"
    alternatives = []
    for tool in tools:
        fn = tool["function"]
        if name is not None and fn["name"] != name:
            continue
        props: dict[str, Any] = {"name": {"const": fn["name"]},
                                 args_key: fn.get("parameters") or {"type": "object"}}
        required = ["name", args_key]
        if fmt == MISTRAL:
            props["id"] = {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}
            required.append("id")
        alternatives.append({"type": "object", "properties": props, "required": required,
                             "additionalProperties": False})
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    rules = compile_schema(schema, "call")
    more = parallel and fmt != LLAMA3  # Llama 3.1's template takes one call per message
    extra = MAX_PARALLEL_CALLS - 1
    if fmt == HERMES:
        block = '"<tool_call>\\n" call "\\n</tool_call>"'
        root = block + (f' ("\\n" {block}){{0,{extra}}}' if more else "")
    elif fmt == LLAMA3:
        root = "call"
    else:
        root = '"[TOOL_CALLS]" "[" call' + (f' ("," space call){{0,{extra}}}' if more else "") \
            + ' "]"'
    if "space ::=" not in rules:
        rules += '\nspace ::= | " "'
    return rules + f"\nroot ::= {root}\n"


# -- parsing the answer ------------------------------------------------------------------------


def parse_tool_calls(fmt: str, text: str) -> tuple[str, list[ToolCall]]:
    """Split generated ``text`` into content (calls removed, not stripped) and tool calls."""
    if fmt == HERMES:
        return _parse_hermes(text)
    if fmt == LLAMA3:
        return _parse_llama3(text)
    return _parse_mistral(text)


def _call(fmt: str, obj: Any, args_keys: tuple[str, ...]) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args: Any = None
    for key in args_keys:
        if key in obj:
            args = obj[key]
            break
    if args is None:
        args = {}
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    ident = obj.get("id")
    if not (isinstance(ident, str) and (fmt != MISTRAL or _MISTRAL_ID.match(ident))):
        ident = new_call_id(fmt)
    return ToolCall(ident, obj["name"], text)


def _parse_hermes(text: str) -> tuple[str, list[ToolCall]]:
    calls: list[ToolCall] = []
    content: list[str] = []
    pos = 0
    while True:
        start = text.find(_HERMES_OPEN, pos)
        if start == -1:
            content.append(text[pos:])
            break
        end = text.find(_HERMES_CLOSE, start)
        body = text[start + len(_HERMES_OPEN): end if end != -1 else len(text)]
        try:
            call = _call(HERMES, json.loads(body), ("arguments", "parameters"))
        except json.JSONDecodeError:
            call = None
        if call is None:  # not a call after all: keep it as text
            content.append(text[pos:])
            break
        content.append(text[pos:start])
        calls.append(call)
        if end == -1:
            break
        pos = end + len(_HERMES_CLOSE)
    return "".join(content), calls


def _decode_objects(text: str) -> tuple[list[Any], int]:
    """JSON values at the start of ``text``, separated by blanks or ';'; and where they end."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
        if pos >= len(text) or text[pos] not in "{[":
            return values, pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return values, pos
        values.append(value)


def _parse_llama3(text: str) -> tuple[str, list[ToolCall]]:
    body = text.lstrip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG):]
    values, end = _decode_objects(body)
    calls = [_call(LLAMA3, v, ("parameters", "arguments")) for v in values]
    if not values or any(c is None for c in calls):
        return text, []
    return body[end:], [c for c in calls if c is not None]


def _parse_mistral(text: str) -> tuple[str, list[ToolCall]]:
    start = text.find(_MISTRAL_MARK)
    if start == -1:
        return text, []
    values, end = _decode_objects(text[start + len(_MISTRAL_MARK):])
    items = values[0] if len(values) == 1 and isinstance(values[0], list) else values
    calls = [_call(MISTRAL, v, ("arguments", "parameters")) for v in items]
    if not calls or any(c is None for c in calls):
        return text, []
    return text[:start] + text[start + len(_MISTRAL_MARK) + end:], \
        [c for c in calls if c is not None]


# -- streaming -------------------------------------------------------------------------------


class ToolCallStream:
    """Streams content text, holding back whatever may be the start of a tool call.

    ``feed`` returns the text a client may see now; ``finish`` parses the whole answer and
    returns the content not yet sent and the calls. A forced call sends no content at all.
    """

    def __init__(self, fmt: str, forced: bool) -> None:
        self.fmt = fmt
        self.forced = forced
        self._text = ""
        self._sent = 0
        self._capturing = forced

    def feed(self, piece: str) -> str:
        self._text += piece
        if self._capturing:
            return ""
        text = self._text
        if self.fmt == LLAMA3:
            # A Llama 3 call is a bare JSON object: decide on the first visible characters.
            body = text.lstrip()
            if body.startswith("{") or body.startswith(_PYTHON_TAG):
                self._capturing = True
                return ""
            if not body or _PYTHON_TAG.startswith(body):  # undecided yet
                return ""
            safe = len(text)
        else:
            mark = _HERMES_OPEN if self.fmt == HERMES else _MISTRAL_MARK
            i = text.find(mark, self._sent)
            if i != -1:
                self._capturing = True
                safe = i
            else:
                safe = len(text) - _partial_suffix(text, mark)
        out = text[self._sent:safe]
        self._sent = max(self._sent, safe)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        content, calls = parse_tool_calls(self.fmt, self._text)
        if self.forced:
            # The grammar admitted nothing but calls: text left over is a call cut short by
            # max_tokens, not an answer.
            return "", calls
        sent = self._text[: self._sent]
        if content.startswith(sent):
            return content[len(sent):], calls
        return self._text[self._sent:], calls


def _partial_suffix(text: str, mark: str) -> int:
    # Length of the longest suffix of text that is a proper prefix of mark.
    for n in range(min(len(mark) - 1, len(text)), 0, -1):
        if text.endswith(mark[:n]):
            return n
    return 0
