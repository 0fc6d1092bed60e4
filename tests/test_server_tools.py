"""Tool calls end to end: real chat templates, real llama.cpp, real HTTP, the ``openai`` client.

Three chat families (``support.tool_models``): Qwen2.5's ``<tool_call>`` blocks, Llama 3.1's
bare JSON call and Mistral's ``[TOOL_CALLS]`` list (Mistral Nemo's template, which also checks
that every call id is 9 alphanumerics). The weights are random, so every call here is grammar-forced
(``tool_choice`` required or named); the forced call must still be a valid call of a tool
offered, with arguments that follow its schema.
"""

from __future__ import annotations

import json
import re

import openai
import pytest
from support.bundles import make_test_bundle, serve_bundle
from support.tool_models import tool_model_gguf

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "required": ["city", "unit"], "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "required": ["zone"], "properties": {
        "zone": {"type": "string", "enum": ["UTC", "CET"]}}}}}
TOOLS = [WEATHER, CLOCK]
ARG_VALUES = {"get_weather": {"city": {"Paris", "Oslo", "Lima"},
                              "unit": {"celsius", "fahrenheit"}},
              "get_time": {"zone": {"UTC", "CET"}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module", params=["qwen25", "llama31", "mistral"])
def family(request, tmp_path_factory):
    name = f"tiny-{request.param}"
    bundle = make_test_bundle(tmp_path_factory.mktemp(name) / "bundle",
                              tool_model_gguf(request.param), name=name, quant="F32")
    server = serve_bundle(bundle)
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    yield name, client
    client.close()
    server.stop()


def _check_call(call) -> dict:
    assert call.type == "function"
    assert call.id
    args = json.loads(call.function.arguments)
    allowed = ARG_VALUES[call.function.name]
    assert set(args) == set(allowed)
    for key, value in args.items():
        assert value in allowed[key]
    return args


def _stream_message(stream) -> tuple[str, list[dict], str | None]:
    """Accumulate a stream the way the openai client's users do: content and tool_calls."""
    content, calls, reason = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            slot["id"] = tc.id or slot["id"]
            if tc.function:
                slot["name"] += tc.function.name or ""
                slot["arguments"] += tc.function.arguments or ""
        reason = choice.finish_reason or reason
    return content, [calls[i] for i in sorted(calls)], reason


def test_forced_call_round_trip(family):
    model, client = family
    r = client.chat.completions.create(model=model, messages=QUESTION, tools=TOOLS,
                                       tool_choice="required", parallel_tool_calls=False,
                                       temperature=0, max_tokens=96)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    _check_call(call)
    if model == "tiny-mistral":
        # Mistral's call carries its own id (the forcing grammar asks for 9 alphanumerics);
        # the template refuses any other id when the history comes back.
        assert re.fullmatch(r"[a-zA-Z0-9]{9}", call.id), call.id
    # The call and the tool's result go back through the model's own template.
    history = [*QUESTION, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'}]
    answer = client.chat.completions.create(model=model, messages=history, tools=TOOLS,
                                            temperature=0, max_tokens=8)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.tool_calls is None
    assert isinstance(answer.choices[0].message.content, str)
    # The history (call + result) was rendered into the prompt, not dropped.
    assert answer.usage.prompt_tokens > r.usage.prompt_tokens + 10


def test_forced_call_round_trip_streamed_matches_plain(family):
    model, client = family
    kw = dict(model=model, messages=QUESTION, tools=TOOLS, tool_choice="required",
              parallel_tool_calls=False, temperature=0, max_tokens=96)
    plain = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    content, calls, reason = _stream_message(client.chat.completions.create(**kw, stream=True))
    assert reason == "tool_calls"
    assert content == ""
    assert len(calls) == 1
    assert (calls[0]["name"], calls[0]["arguments"]) == (plain.function.name,
                                                         plain.function.arguments)
    history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0]["id"], "type": "function",
         "function": {"name": calls[0]["name"], "arguments": calls[0]["arguments"]}}]},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "21 degrees"}]
    text, more_calls, reason = _stream_message(client.chat.completions.create(
        model=model, messages=history, tools=TOOLS, temperature=0, max_tokens=8, stream=True))
    assert reason in ("stop", "length")
    assert more_calls == []
    plain_answer = client.chat.completions.create(model=model, messages=history, tools=TOOLS,
                                                  temperature=0, max_tokens=8)
    assert text == plain_answer.choices[0].message.content


def test_named_tool_choice_calls_that_tool(family):
    model, client = family
    r = client.chat.completions.create(
        model=model, messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=96,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = r.choices[0].message.tool_calls
    assert calls and {c.function.name for c in calls} == {"get_time"}
    for c in calls:
        _check_call(c)


def test_parallel_calls_are_each_valid(family):
    model, client = family
    r = client.chat.completions.create(model=model, messages=QUESTION, tools=TOOLS,
                                       tool_choice="required", temperature=0.9, seed=3,
                                       max_tokens=400)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert 1 <= len(calls) <= 8
    if model == "tiny-llama31":  # Llama 3.1's template takes one call per message
        assert len(calls) == 1
    for c in calls:
        _check_call(c)
    assert len({c.id for c in calls}) == len(calls)
