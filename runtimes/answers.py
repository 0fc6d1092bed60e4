"""From a validated request to a constrained prompt, and from engine events to OpenAI choices.

``constrain`` checks what the request needs against what the engine can do (a 400 naming the
field otherwise), compiles response_format / grammar / a forced tool call to one GBNF grammar
and renders the prompt with the tools. ``Answer`` collects the events of one generation into
content, tool calls and logprobs, in the shapes of OpenAI's chat and completions APIs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from edgepack.runtimes.engine import (
    FEATURE_GRAMMAR,
    FEATURE_LOGPROBS,
    FEATURE_TOOLS,
    Engine,
    Prompt,
    SamplingParams,
    TokenLogprob,
)
from edgepack.runtimes.openai_schema import ApiError, GenerationRequest
from edgepack.runtimes.structured import grammar_for
from edgepack.runtimes.tools import (
    ToolCall,
    ToolCallStream,
    detect_tool_format,
    forced_call_grammar,
)


@dataclass(frozen=True)
class Constrained:
    """A request ready for the engine: prompt, sampling (with grammar), tool-call syntax."""

    prompt: Prompt
    params: SamplingParams
    tool_format: str | None  # None: the answer is not parsed for tool calls


def _unsupported(engine: Engine, param: str, what: str) -> ApiError:
    return ApiError(f"{what} is not supported by this model's engine ({type(engine).__name__}); "
                    f"remove '{param}' or serve a GGUF bundle (llama.cpp engine)",
                    param=param, code="unsupported_parameter")


def check_features(engine: Engine, req: GenerationRequest) -> None:
    """400 when the request needs something the engine lacks (cheap; on the event loop)."""
    have = engine.features
    if req.structure is not None and FEATURE_GRAMMAR not in have:
        raise _unsupported(engine, req.structure.param, "grammar-constrained output")
    if req.params.logprobs is not None and FEATURE_LOGPROBS not in have:
        raise _unsupported(engine, "logprobs", "logprobs")
    if req.tools_active:
        if FEATURE_TOOLS not in have:
            raise _unsupported(engine, "tools", "tool calling")
        if req.tool_forced and FEATURE_GRAMMAR not in have:
            raise _unsupported(engine, "tool_choice", f"tool_choice {req.tool_choice!r}")


def constrain(engine: Engine, req: GenerationRequest, chat: bool) -> Constrained:
    """Compile the grammar and render the prompt (may be slow: run it off the event loop).

    Raises ApiError(400) naming the field for a schema, grammar or template that cannot be
    used; PromptTooLongError and ValueError from the engine pass through.
    """
    grammar: str | None = None
    fmt: str | None = None
    if req.tools_active:
        fmt = detect_tool_format(engine.chat_template)
        if fmt is None:
            raise ApiError(
                "this model's chat template has no tool-call support (none of the tool-call "
                "syntaxes edgepack parses: Qwen/Hermes <tool_call>, Llama 3.1+ JSON, Mistral "
                "[TOOL_CALLS]); send the request without 'tools' or with tool_choice 'none', "
                "or serve a model whose template renders tools",
                param="tools", code="tools_unsupported_by_template")
        if req.tool_forced:
            try:
                grammar = forced_call_grammar(fmt, req.tools, req.tool_name,
                                              req.parallel_tool_calls)
            except ValueError as e:
                raise ApiError(f"a tool's parameters schema cannot be enforced: {e}",
                               param="tools", code="invalid_value") from e
    if req.structure is not None:
        try:
            grammar = grammar_for(req.structure)
        except ValueError as e:
            raise ApiError(str(e), param=req.structure.param, code="invalid_value") from e
    if grammar is not None:
        try:
            engine.check_grammar(grammar)
        except ValueError as e:
            param = req.structure.param if req.structure is not None else "tools"
            raise ApiError(str(e), param=param, code="invalid_grammar") from e
    if chat:
        prompt = engine.prepare_chat(req.messages, list(req.tools) if req.tools_active else None)
    else:
        prompt = engine.prepare_completion(req.prompt)
    return Constrained(prompt, replace(req.params, grammar=grammar), fmt)


# -- logprobs shapes -----------------------------------------------------------------------------


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI chat ``choices[].logprobs``."""
    return {"content": [{
        "token": _text(t.piece), "logprob": t.logprob, "bytes": list(t.piece),
        "top_logprobs": [{"token": _text(p), "logprob": lp, "bytes": list(p)}
                         for p, lp in t.top],
    } for t in items], "refusal": None}


def completion_logprobs(items: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """OpenAI completions ``choices[].logprobs``; ``offset``: text length before these tokens."""
    offsets = []
    for t in items:
        offsets.append(offset)
        offset += len(_text(t.piece))
    return {"tokens": [_text(t.piece) for t in items],
            "token_logprobs": [t.logprob for t in items],
            "top_logprobs": [{_text(p): lp for p, lp in t.top} for t in items],
            "text_offset": offsets}


# -- collecting an answer ------------------------------------------------------------------------


class Answer:
    """Content, tool calls and logprobs of one choice, streamed or collected."""

    def __init__(self, tool_format: str | None, forced: bool, want_logprobs: bool) -> None:
        self._tools = ToolCallStream(tool_format, forced) if tool_format else None
        self.want_logprobs = want_logprobs
        self.parts: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.calls: list[ToolCall] = []
        self._text_len = 0

    def feed(self, text: str, logprobs: tuple[TokenLogprob, ...]) -> str:
        """Record a piece; return the content a client may see now."""
        if self.want_logprobs:
            self.logprobs.extend(logprobs)
        out = self._tools.feed(text) if self._tools is not None else text
        if out:
            self.parts.append(out)
        return out

    def finish(self) -> str:
        """Parse tool calls at the end; return content not yet released."""
        if self._tools is None:
            return ""
        tail, self.calls = self._tools.finish()
        if tail:
            self.parts.append(tail)
        return tail

    @property
    def content(self) -> str:
        return "".join(self.parts)

    def finish_reason(self, reason: str) -> str:
        # As llama-server: "tool_calls" when the model finished its calls; "length" stays, so
        # a client does not run calls from an answer that was cut short.
        return "tool_calls" if self.calls and reason == "stop" else reason

    def message(self) -> dict[str, Any]:
        content: str | None = self.content
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if self.calls:
            msg["content"] = content.strip() or None if content else None
            msg["tool_calls"] = [c.to_openai() for c in self.calls]
        return msg

    def take_logprobs(self) -> list[TokenLogprob]:
        """The logprobs collected since the last call (for a stream chunk)."""
        items, self.logprobs = self.logprobs, []
        return items

    def completion_offset(self, items: list[TokenLogprob]) -> int:
        start = self._text_len
        self._text_len += sum(len(_text(t.piece)) for t in items)
        return start


def stream_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """``delta.tool_calls`` for a stream chunk: each call whole, with its index."""
    return [{"index": i, **c.to_openai()} for i, c in enumerate(calls)]
