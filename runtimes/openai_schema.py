"""OpenAI request validation and error bodies.

Every check names the parameter, the value's type and what was expected, and raises
``ApiError`` (400 by default), which the app renders as OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``. Nothing here may raise anything else
for any JSON a client sends: bad input is a 400, never a 500.

Fields edgepack does not implement (n > 1, echo, logit_bias, ...) are refused with a 400
naming them rather than ignored, so a client never gets an answer to a question it did not
ask. Unknown fields are ignored, as OpenAI-compatible servers commonly do.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgepack.runtimes.engine import SamplingParams
from edgepack.runtimes.structured import FormatError, Structure, parse_response_format

MAX_STOP = 4
MAX_TOOLS = 128
MAX_TOP_LOGPROBS = 20
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
TOOL_CHOICES = ("none", "auto", "required")
ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error answered with an OpenAI-shaped body and a real status code."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def _tname(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(v), type(v).__name__)


def _bad(param: str, value: Any, expected: str) -> ApiError:
    return ApiError(
        f"'{param}' must be {expected}, got {_tname(value)}"
        + (f" {value!r}" if isinstance(value, (int, float, str)) and len(repr(value)) < 60 else ""),
        param=param,
        code="invalid_type" if not _is_range(expected) else "invalid_value",
    )


def _is_range(expected: str) -> bool:
    return "between" in expected or "at least" in expected or "one of" in expected


def _number(body: Mapping[str, Any], key: str, low: float, high: float) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(key, v, "a number")
    if not low <= v <= high:
        raise _bad(key, v, f"a number between {low:g} and {high:g}")
    return float(v)


def _integer(body: Mapping[str, Any], key: str, low: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(key, v, "an integer")
    if v < low:
        raise _bad(key, v, f"an integer of at least {low}")
    return v


def _boolean(body: Mapping[str, Any], key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(key, v, "a boolean")
    return v


def _unsupported(body: Mapping[str, Any], key: str, allowed: tuple[Any, ...] = (None,)) -> None:
    if body.get(key) not in allowed:
        raise ApiError(
            f"'{key}' is not supported by this server (edgepack serves one model with plain "
            "text generation); remove it",
            param=key,
            code="unsupported_parameter",
        )


def require_object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {_tname(body)}",
                       code="invalid_type")
    return body


def require_model(body: Mapping[str, Any]) -> str:
    v = body.get("model")
    if not isinstance(v, str) or not v:
        raise _bad("model", v, "a non-empty string naming the model (see GET /v1/models)")
    return v


@dataclass(frozen=True)
class GenerationRequest:
    """A validated chat or completion request."""

    model: str
    stream: bool
    include_usage: bool
    params: SamplingParams
    messages: tuple[dict[str, Any], ...] = ()
    prompt: str = ""
    structure: Structure | None = None  # response_format / grammar
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: str = "auto"  # none | auto | required | function (then tool_name)
    tool_name: str | None = None
    parallel_tool_calls: bool = True

    @property
    def tools_active(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def tool_forced(self) -> bool:
        return self.tools_active and self.tool_choice in ("required", "function")


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,) if v else ()
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        if len(v) > MAX_STOP:
            raise ApiError(f"'stop' may hold at most {MAX_STOP} sequences, got {len(v)}",
                           param="stop", code="invalid_value")
        return tuple(s for s in v if s)
    raise _bad("stop", v, "a string or an array of strings")


def _sampling(body: Mapping[str, Any]) -> SamplingParams:
    defaults = SamplingParams()
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    seed = _integer(body, "seed", -(2**63))
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    min_p = _number(body, "min_p", 0.0, 1.0)
    top_k = _integer(body, "top_k", 0)
    repeat = _number(body, "repeat_penalty", 0.0, 10.0)
    freq = _number(body, "frequency_penalty", -2.0, 2.0)
    pres = _number(body, "presence_penalty", -2.0, 2.0)
    n = _integer(body, "n", 1)
    if n not in (None, 1):
        # Several choices would each need their own sequence; send n requests instead
        # (they are decoded one after another either way).
        raise ApiError("'n' must be 1: this server returns one choice per request; send "
                       "several requests for several answers",
                       param="n", code="unsupported_parameter")
    _unsupported(body, "echo", (None, False))
    for key in ("functions", "logit_bias", "suffix"):
        _unsupported(body, key, (None, [], {}))
    _unsupported(body, "function_call", (None, "none"))
    _unsupported(body, "best_of", (None, 1))
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None else top_p,
        top_k=defaults.top_k if top_k is None else top_k,
        min_p=defaults.min_p if min_p is None else min_p,
        repeat_penalty=defaults.repeat_penalty if repeat is None else repeat,
        frequency_penalty=0.0 if freq is None else freq,
        presence_penalty=0.0 if pres is None else pres,
        seed=seed,
        stop=_stop(body),
    )


def _chat_logprobs(body: Mapping[str, Any]) -> int | None:
    # Chat: logprobs is a boolean, top_logprobs (0-20) the alternatives per token.
    on = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs", 0)
    if top is not None and top > MAX_TOP_LOGPROBS:
        raise _bad("top_logprobs", top, f"an integer between 0 and {MAX_TOP_LOGPROBS}")
    if top and not on:
        raise ApiError("'top_logprobs' needs 'logprobs': true", param="top_logprobs",
                       code="invalid_value")
    return (top or 0) if on else None


def _completion_logprobs(body: Mapping[str, Any]) -> int | None:
    # Legacy completions: logprobs is the number of alternatives (0-20; OpenAI allows 5).
    v = body.get("logprobs")
    if v is None or v is False:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_TOP_LOGPROBS:
        raise _bad("logprobs", v, f"an integer between 0 and {MAX_TOP_LOGPROBS}")
    return v


def _structure(body: Mapping[str, Any]) -> Structure | None:
    try:
        return parse_response_format(body.get("response_format"), body.get("grammar"))
    except FormatError as e:
        raise ApiError(str(e), param=e.param, code="invalid_value") from e


def _tools(body: Mapping[str, Any]) -> tuple[tuple[dict[str, Any], ...], str, str | None, bool]:
    raw = body.get("tools")
    tools: list[dict[str, Any]] = []
    if raw is not None:
        if not isinstance(raw, list):
            raise _bad("tools", raw, "an array of function tools")
        if len(raw) > MAX_TOOLS:
            raise ApiError(f"'tools' holds {len(raw)} tools, at most {MAX_TOOLS} allowed",
                           param="tools", code="invalid_value")
        for i, t in enumerate(raw):
            param = f"tools[{i}]"
            if not isinstance(t, dict) or t.get("type") != "function":
                raise _bad(param, t, 'an object {"type": "function", "function": {...}}')
            fn = t.get("function")
            if not isinstance(fn, dict):
                raise _bad(f"{param}.function", fn, "an object with 'name' and 'parameters'")
            name = fn.get("name")
            if not isinstance(name, str):
                raise _bad(f"{param}.function.name", name, "a string")
            if not _TOOL_NAME.match(name):
                raise ApiError(f"'{param}.function.name' is {name[:80]!r}; a function name is "
                               "1-64 letters, digits, '_' or '-'",
                               param=f"{param}.function.name", code="invalid_value")
            params = fn.get("parameters")
            if params is not None and not isinstance(params, dict):
                raise _bad(f"{param}.function.parameters", params, "a JSON schema object")
            desc = fn.get("description")
            if desc is not None and not isinstance(desc, str):
                raise _bad(f"{param}.function.description", desc, "a string")
            clean = {"name": name, "parameters": params or {"type": "object", "properties": {}}}
            if desc:
                clean["description"] = desc
            tools.append({"type": "function", "function": clean})
    names = [t["function"]["name"] for t in tools]
    choice = body.get("tool_choice")
    tool_name: str | None = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function")
        tool_name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(tool_name, str):
            raise _bad("tool_choice", choice,
                       'one of none, auto, required or {"type": "function", "function": '
                       '{"name": ...}}')
        if tool_name not in names:
            raise ApiError(f"'tool_choice' names function {tool_name!r}, which is not in "
                           f"'tools' ({', '.join(names) or 'no tools given'})",
                           param="tool_choice", code="invalid_value")
        choice = "function"
    elif choice not in TOOL_CHOICES:
        raise _bad("tool_choice", choice, "one of none, auto, required or a function object")
    if choice in ("required", "function") and not tools:
        raise ApiError(f"'tool_choice' {choice!r} needs 'tools'", param="tool_choice",
                       code="invalid_value")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise _bad("parallel_tool_calls", parallel, "a boolean")
    return tuple(tools), choice, tool_name, parallel


def _stream_options(body: Mapping[str, Any], stream: bool) -> bool:
    v = body.get("stream_options")
    if v is None:
        return False
    if not isinstance(v, dict):
        raise _bad("stream_options", v, "an object")
    if not stream:
        raise ApiError("'stream_options' is only allowed when 'stream' is true",
                       param="stream_options", code="invalid_value")
    inc = v.get("include_usage", False)
    if not isinstance(inc, bool):
        raise _bad("stream_options.include_usage", inc, "a boolean")
    return inc


def _content(i: int, content: Any) -> str:
    param = f"messages[{i}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError(
                    f"'{param}[{j}]' must be a text part {{\"type\": \"text\", \"text\": ...}}; "
                    "this model reads text only",
                    param=f"{param}[{j}]", code="invalid_value",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"{param}[{j}].text", text, "a string")
            parts.append(text)
        return "".join(parts)
    raise _bad(param, content, "a string or an array of text parts")


def parse_chat(body: Any) -> GenerationRequest:
    """Validate a /v1/chat/completions body; raise ApiError(400) naming the bad parameter."""
    body = require_object(body)
    model = require_model(body)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _bad("messages", raw, "a non-empty array of messages")
    messages = [_message(i, m) for i, m in enumerate(raw)]
    stream = _boolean(body, "stream")
    tools, choice, tool_name, parallel = _tools(body)
    structure = _structure(body)
    if structure is not None and tools and choice in ("required", "function"):
        raise ApiError("a forced tool call and a structured 'response_format'/'grammar' "
                       "cannot both constrain one answer; drop one of them",
                       param="tool_choice", code="invalid_value")
    params = SamplingParams(**{**_sampling(body).__dict__, "logprobs": _chat_logprobs(body)})
    return GenerationRequest(
        model=model,
        stream=stream,
        include_usage=_stream_options(body, stream),
        params=params,
        messages=tuple(messages),
        structure=structure,
        tools=tools,
        tool_choice=choice,
        tool_name=tool_name,
        parallel_tool_calls=parallel,
    )


def _message(i: int, m: Any) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise _bad(f"messages[{i}]", m, "an object with 'role' and 'content'")
    role = m.get("role")
    if role not in ROLES:
        raise _bad(f"messages[{i}].role", role, f"one of {', '.join(ROLES)}")
    content = m.get("content")
    calls = m.get("tool_calls") if role == "assistant" else None
    if content is None and role == "assistant":
        content = ""
    # "developer" is OpenAI's newer name for "system"; chat templates know "system".
    out: dict[str, Any] = {"role": "system" if role == "developer" else role,
                           "content": _content(i, content)}
    if calls:
        out["tool_calls"] = _history_calls(i, calls)
    if role == "tool":
        ident = m.get("tool_call_id")
        if not isinstance(ident, str) or not ident:
            raise _bad(f"messages[{i}].tool_call_id", ident,
                       "the id of the tool call this message answers")
        out["tool_call_id"] = ident
        if isinstance(m.get("name"), str):
            out["name"] = m["name"]
    return out


def _history_calls(i: int, calls: Any) -> list[dict[str, Any]]:
    param = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise _bad(param, calls, "an array of tool calls")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"{param}[{j}].function", fn, "an object with 'name' and 'arguments'")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            # Templates print arguments with |tojson and expect an object (as transformers
            # documents and llama.cpp passes them); text that is not JSON stays text.
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                pass
        ident = c.get("id")
        out.append({"id": ident if isinstance(ident, str) else f"call_{i}_{j}",
                    "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def parse_completion(body: Any) -> GenerationRequest:
    """Validate a /v1/completions body; raise ApiError(400) naming the bad parameter."""
    body = require_object(body)
    model = require_model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _bad("prompt", prompt, "a string (or an array holding one string)")
    stream = _boolean(body, "stream")
    params = _sampling(body)
    for key in ("tools", "tool_choice"):
        _unsupported(body, key, (None, [], "none"))
    changes: dict[str, Any] = {"logprobs": _completion_logprobs(body)}
    if params.max_tokens is None:
        # OpenAI's default for the legacy completions route.
        changes["max_tokens"] = 16
    return GenerationRequest(
        model=model,
        stream=stream,
        include_usage=_stream_options(body, stream),
        params=SamplingParams(**{**params.__dict__, **changes}),
        prompt=prompt,
        structure=_structure(body),
    )


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[str, ...]
    encoding_format: str  # float | base64


def parse_embedding(body: Any, max_inputs: int = 256) -> EmbeddingRequest:
    """Validate a /v1/embeddings body; raise ApiError(400) naming the bad parameter."""
    body = require_object(body)
    model = require_model(body)
    raw = body.get("input")
    if isinstance(raw, str):
        inputs: list[str] = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(s, str) for s in raw):
        inputs = list(raw)
    else:
        raise _bad("input", raw, "a string or a non-empty array of strings")
    if len(inputs) > max_inputs:
        raise ApiError(f"'input' holds {len(inputs)} strings, at most {max_inputs} allowed",
                       param="input", code="invalid_value")
    for i, s in enumerate(inputs):
        if not s:
            raise ApiError(f"'input[{i}]' is empty; every input needs text",
                           param=f"input[{i}]", code="invalid_value")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise _bad("encoding_format", fmt, "one of float, base64")
    _unsupported(body, "dimensions")
    return EmbeddingRequest(model=model, inputs=tuple(inputs), encoding_format=fmt)
