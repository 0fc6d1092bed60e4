"""Tool-call syntax: detection on real chat templates, parsing, streaming hold-back.

Templates are llama.cpp's copies of the real ones (``support.tool_models.template_source``),
rendered with the same Jinja2 formatter the llama.cpp engine uses.
"""

from __future__ import annotations

import json

import pytest
from edgepack.runtimes.tools import (
    HERMES,
    LLAMA3,
    MISTRAL,
    ToolCallStream,
    detect_tool_format,
    forced_call_grammar,
    parse_tool_calls,
)
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from support.tool_models import template_source

TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


@pytest.mark.parametrize(("file_name", "fmt"), [
    ("Qwen-Qwen2.5-7B-Instruct.jinja", HERMES),
    ("Qwen-Qwen3-0.6B.jinja", HERMES),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", LLAMA3),
    ("meta-llama-Llama-3.2-3B-Instruct.jinja", LLAMA3),
    ("mistralai-Mistral-Nemo-Instruct-2407.jinja", MISTRAL),
    ("google-gemma-2-2b-it.jinja", None),
])
def test_detects_the_format_of_real_templates(file_name, fmt):
    assert detect_tool_format(template_source(file_name)) == fmt


def test_template_without_tools_is_not_a_tool_template(tiny_llama_dir):
    smollm_template = (tiny_llama_dir / "chat_template.jinja").read_text()
    assert detect_tool_format(smollm_template) is None
    assert detect_tool_format(None) is None


@pytest.mark.parametrize("file_name", ["Qwen-Qwen2.5-7B-Instruct.jinja",
                                       "meta-llama-Llama-3.1-8B-Instruct.jinja",
                                       "mistralai-Mistral-Nemo-Instruct-2407.jinja"])
def test_templates_render_tools_and_call_history(file_name):
    # The message shapes the server hands the engine (openai_schema._message): arguments as
    # objects, tool results with their call id.
    fmt = Jinja2ChatFormatter(template_source(file_name), eos_token="</s>", bos_token="<s>")
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "abcDEF123", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "minus 3 and snowing"},
    ]
    prompt = fmt(messages=messages, tools=[TOOL]).prompt
    assert "get_weather" in prompt.split("Weather in Oslo?")[0] or "get_weather" in prompt
    assert "minus 3 and snowing" in prompt
    assert '"city": "Oslo"' in prompt


def test_parse_hermes_blocks_and_text():
    text = ('Let me check. <tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>')
    content, calls = parse_tool_calls(HERMES, text)
    assert content.strip() == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 1}), ("b", {})]
    assert all(c.id.startswith("call_") for c in calls)


def test_parse_hermes_broken_json_stays_text():
    text = "<tool_call>\n{not json}\n</tool_call>"
    assert parse_tool_calls(HERMES, text) == (text, [])


def test_parse_llama3_json_and_python_tag():
    for text in ('{"name": "a", "parameters": {"x": "y"}}',
                 '<|python_tag|>{"name": "a", "parameters": {"x": "y"}}'):
        content, calls = parse_tool_calls(LLAMA3, text)
        assert content == ""
        assert [(c.name, c.arguments) for c in calls] == [("a", '{"x": "y"}')]
    assert parse_tool_calls(LLAMA3, "Paris is sunny.") == ("Paris is sunny.", [])
    assert parse_tool_calls(LLAMA3, '{"answer": 42}') == ('{"answer": 42}', [])


def test_parse_mistral_keeps_valid_ids():
    text = ('[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}, "id": "abcDEF123"}, '
            '{"name": "b", "arguments": {}, "id": "bad"}]')
    content, calls = parse_tool_calls(MISTRAL, text)
    assert content == ""
    assert calls[0].id == "abcDEF123"
    assert len(calls[1].id) == 9 and calls[1].id.isalnum()


@pytest.mark.parametrize(("fmt", "pieces", "shown"), [
    (HERMES, ["Sure", ". <tool", "_call>\n{\"name\": \"a\", ", "\"arguments\": {}}\n</tool_call>"],
     "Sure. "),
    (MISTRAL, ["[TOOL", "_CALLS][{\"name\": \"a\", \"arguments\": {}}]"], ""),
    (LLAMA3, ["  ", "{\"name\": \"a\",", " \"parameters\": {}}"], ""),
    (LLAMA3, ["<|python", "_tag|>{\"name\": \"a\", \"parameters\": {}}"], ""),
])
def test_stream_never_shows_a_call_as_content(fmt, pieces, shown):
    stream = ToolCallStream(fmt, forced=False)
    out = "".join(stream.feed(p) for p in pieces)
    tail, calls = stream.finish()
    assert out + tail == shown
    assert [c.name for c in calls] == ["a"]


def test_stream_passes_plain_text_through():
    for fmt in (HERMES, LLAMA3, MISTRAL):
        stream = ToolCallStream(fmt, forced=False)
        out = "".join(stream.feed(p) for p in ["Hello", " <", "b>world</b>"])
        tail, calls = stream.finish()
        assert (out + tail, calls) == ("Hello <b>world</b>", [])


def test_forced_grammar_offers_only_the_named_tool():
    other = {"type": "function", "function": {"name": "other", "parameters": {}}}
    g = forced_call_grammar(HERMES, [TOOL, other], "other", parallel=False)
    assert '"\\"other\\""' in g and "get_weather" not in g
    assert g.rstrip().endswith('root ::= "<tool_call>\\n" call "\\n</tool_call>"')
