"""The server over real HTTP on 127.0.0.1, driven by the official ``openai`` client.

One server process (SmolLM2-135M-Instruct Q4_1, real llama.cpp inference) serves the module.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

MODEL = "smollm2-135m-instruct"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(chat_server):
    c = openai.OpenAI(base_url=chat_server.base_url + "/v1", api_key="unused", max_retries=0)
    yield c
    c.close()


def _metrics(base_url: str) -> dict[str, float]:
    text = httpx.get(base_url + "/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def _assert_openai_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert {"message", "type", "code"} <= err.keys()
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def test_models_lists_the_bundle_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_answers_with_usage(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5
    assert 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_plain_answer(client):
    messages = [{"role": "user", "content": "Name three colours."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20,
                                           temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text == plain.choices[0].message.content
    assert finishes[-1] == plain.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completion_respects_max_tokens(client):
    r = client.completions.create(model=MODEL, prompt="The sun is", max_tokens=7,
                                  temperature=0)
    assert r.usage.completion_tokens == 7
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].text


def test_completion_stream_ends_with_done(chat_server):
    body = {"model": MODEL, "prompt": "One, two,", "max_tokens": 5, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", chat_server.base_url + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert len(events) >= 3


def test_stop_sequence_cuts_the_text(client):
    full = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12,
                                     temperature=0).choices[0].text
    assert " 6" in full, full  # the model counts on; the test needs a word to stop at
    cut = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=12,
                                    temperature=0, stop=[" 6"])
    assert cut.choices[0].text == full[: full.index(" 6")]
    assert cut.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16,
                                         temperature=1.0, seed=seed).choices[0].text

    assert sample(1234) == sample(1234)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user",
                                                                  "content": "hi"}])
    assert e.value.status_code == 404
    assert "gpt-4o" in e.value.body["message"]
    assert e.value.body["code"] == "model_not_found"


def test_malformed_json_is_400(chat_server):
    r = httpx.post(chat_server.base_url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert _assert_openai_error(r, 400)["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "messages": "hello"}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"},
         "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 7},
         "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
         "stream"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
        ({"model": 42, "messages": []}, "model"),
        ([1, 2, 3], None),
    ],
)
def test_wrong_types_are_400_naming_the_param(chat_server, body, param):
    r = httpx.post(chat_server.base_url + "/v1/chat/completions", json=body)
    _assert_openai_error(r, 400, param)


def test_prompt_longer_than_context_is_400_naming_both_lengths(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * 3000, max_tokens=1)
    msg = e.value.body["message"]
    assert "2048" in msg
    assert e.value.body["code"] == "context_length_exceeded"
    n_prompt = int(msg.split("prompt is ")[1].split()[0])
    assert n_prompt > 2048


def test_body_over_limit_is_413(chat_server):
    big = {"model": MODEL, "prompt": "x" * (1 << 20)}
    r = httpx.post(chat_server.base_url + "/v1/completions", json=big)
    _assert_openai_error(r, 413)


def test_embeddings_on_a_chat_model_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL, input="hello")
    assert e.value.body["code"] == "wrong_model_kind"


def test_unknown_route_is_openai_shaped_404(chat_server):
    _assert_openai_error(httpx.get(chat_server.base_url + "/v1/nothing"), 404)


def test_health_and_readiness_report_the_model(chat_server):
    assert httpx.get(chat_server.base_url + "/healthz").json()["status"] == "ok"
    ready = httpx.get(chat_server.base_url + "/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert body["model"] == MODEL
    assert body["quant"] == "Q4_1"
    assert len(body["sha256"]) == 64
    assert body["bundle_version"] == "1"


def test_metrics_parse_and_count(client, chat_server):
    before = _metrics(chat_server.base_url)
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, temperature=0)
    after = _metrics(chat_server.base_url)
    key = f"edgepack_requests_total{{model={MODEL},route=/v1/completions,status=200}}"
    assert after[key] == before.get(key, 0) + 1
    tokens = f"edgepack_completion_tokens_total{{model={MODEL}}}"
    assert after[tokens] - before.get(tokens, 0) == 4
    assert after["edgepack_process_resident_memory_bytes"] > 50e6
    assert after["edgepack_ready"] == 1
    assert after[f"edgepack_model_ready{{model={MODEL}}}"] == 1
    assert after[f"edgepack_queue_depth{{model={MODEL}}}"] == 0
    assert after[f"edgepack_time_to_first_token_seconds_count{{model={MODEL}}}"] >= 1
