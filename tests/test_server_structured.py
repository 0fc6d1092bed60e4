"""Structured output, the grammar extension and logprobs over real HTTP, official ``openai`` client.

SmolLM2-135M-Instruct Q4_1 with real llama.cpp grammar-constrained sampling.
"""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
from pydantic import BaseModel

MODEL = "smollm2-135m-instruct"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(chat_server):
    c = openai.OpenAI(base_url=chat_server.base_url + "/v1", api_key="unused", max_retries=0)
    yield c
    c.close()


class Person(BaseModel):
    name: str
    age: int


class Weather(BaseModel):
    city: str
    sky: str
    celsius: int


def _chat(base_url: str, **body) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40,
            **body}
    return httpx.post(base_url + "/v1/chat/completions", json=body, timeout=120)


def test_parse_fills_a_pydantic_model(client):
    r = client.chat.completions.parse(
        model=MODEL, temperature=0, max_tokens=60, response_format=Person,
        messages=[{"role": "user", "content": "Alice is 31 years old. Reply as JSON."}])
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(msg.parsed, Person)
    assert msg.parsed == Person.model_validate_json(msg.content)


def test_parse_enforces_the_schema_even_when_the_prompt_does_not_ask_for_json(client):
    # Without the grammar a 135M model answers this in prose; with it, the answer must parse.
    r = client.chat.completions.parse(
        model=MODEL, temperature=0.7, seed=7, max_tokens=80, response_format=Weather,
        messages=[{"role": "user", "content": "Tell me a short poem about the sea."}])
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(r.choices[0].message.parsed, Weather)


def test_json_object_is_an_object(client):
    r = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=200, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Describe a cat as JSON with two fields."}])
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a JSON object's prefix
        assert r.choices[0].message.content.lstrip().startswith("{")


def test_json_schema_streamed_matches_plain(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "strict": True,
                                                   "schema": Person.model_json_schema()}}
    messages = [{"role": "user", "content": "Bob is 40. JSON please."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                           max_tokens=60, response_format=fmt)
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                            max_tokens=60, response_format=fmt, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == plain.choices[0].message.content
    Person.model_validate_json(text)


def test_grammar_extension_constrains_completions(chat_server):
    r = httpx.post(chat_server.base_url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": "Is the sky green? Answer:", "max_tokens": 5,
        "grammar": 'root ::= " yes" | " no"'})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] in (" yes", " no")


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"grammar": "root ::= ( broken"}, "grammar", "invalid_grammar"),
    ({"grammar": ""}, "grammar", "invalid_value"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "invalid_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
     "response_format.json_schema.schema", "invalid_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"$ref": "https://example.com/s.json"}}}},
     "response_format", "invalid_value"),
    ({"response_format": {"type": "json_object"}, "grammar": 'root ::= "a"'}, "grammar",
     "invalid_value"),
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ({"n": 2}, "n", "unsupported_parameter"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools",
     "tools_unsupported_by_template"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
     "tools[0].function.name", "invalid_value"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice",
     "invalid_value"),
])
def test_bad_structure_and_tool_fields_are_400(chat_server, body, param, code):
    r = _chat(chat_server.base_url, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, code), err
    # The server keeps serving after each refusal.
    assert httpx.get(chat_server.base_url + "/readyz").status_code == 200


def test_tool_choice_none_ignores_tools_on_any_template(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0,
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice="none")
    assert r.choices[0].message.tool_calls is None


def test_chat_logprobs_shape(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=6,
        temperature=0, logprobs=True, top_logprobs=3)
    items = r.choices[0].logprobs.content
    assert len(items) == r.usage.completion_tokens
    assert "".join(i.token for i in items) == r.choices[0].message.content
    for item in items:
        assert item.logprob <= 0
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token
        assert len(item.top_logprobs) == 3
        lps = [t.logprob for t in item.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert item.top_logprobs[0].token == item.token
        assert math.isclose(item.top_logprobs[0].logprob, item.logprob)
        assert sum(math.exp(lp) for lp in lps) <= 1.0 + 1e-6


def test_chat_logprobs_streamed_match_plain(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Count to three."}],
              max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    plain = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = [i for c in chunks if c.choices and c.choices[0].logprobs
                for i in c.choices[0].logprobs.content]
    assert [(i.token, round(i.logprob, 4)) for i in streamed] == \
        [(i.token, round(i.logprob, 4)) for i in plain.choices[0].logprobs.content]


def test_completion_logprobs_shape(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                  temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    text = r.choices[0].text
    assert "".join(lp.tokens) == text
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == 4
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    for tok, top in zip(lp.tokens, lp.top_logprobs, strict=True):
        assert len(top) == 2
        assert max(top, key=top.get) == tok


def test_logprobs_off_by_default(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=3)
    assert r.choices[0].logprobs is None
