"""Continuous batching (``runtimes/batch.py``) over real HTTP with the official ``openai`` client.

SmolLM2-135M-Instruct Q4_1, a server with ``n_parallel`` slots beside the one-sequence server
(``chat_server``): greedy answers decoded together must be the ones decoded alone.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from pydantic import BaseModel
from support.bundles import make_test_bundle, serve_bundle

MODEL = "smollm2-135m-instruct"
pytestmark = pytest.mark.slow

PROMPTS = ["Write a short story about a lighthouse.", "What is the capital of France?",
           "List three fruits.", "Explain rain to a child."]


@pytest.fixture(scope="module")
def batched_server(tmp_path_factory):
    bundle = make_test_bundle(tmp_path_factory.mktemp("batched") / "bundle",
                              engine={"n_parallel": 4, "n_ctx": 1024, "n_threads": 2},
                              server={"queue_size": 4})
    server = serve_bundle(bundle)
    yield server
    server.stop()


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def _stream_text(client: openai.OpenAI, prompt: str, max_tokens: int = 48) -> str:
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0,
        max_tokens=max_tokens, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_readiness_reports_the_slots(batched_server):
    assert httpx.get(batched_server.base_url + "/readyz").status_code == 200


def test_llama_cpp_stays_quiet_in_the_log(batched_server):
    """llama.cpp's own log (about 1,000 lines per context) stays out of the server's stderr,
    as it does for the one-sequence engine: an operator's journal gets edgepack's lines."""
    log = batched_server.log_path.read_text(errors="replace")
    assert "llama_context:" not in log and "llama_graph_n_input_tensors" not in log, log[-2000:]


def test_four_concurrent_streams_match_single_stream(batched_server, chat_server):
    single = _client(chat_server)
    alone = [_stream_text(single, p) for p in PROMPTS]
    batched = _client(batched_server)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: _stream_text(batched, p), PROMPTS))
    assert together == alone
    # And again, now that every slot holds a cached prompt prefix.
    with ThreadPoolExecutor(4) as pool:
        again = list(pool.map(lambda p: _stream_text(batched, p), reversed(PROMPTS)))
    assert again == list(reversed(alone))


class City(BaseModel):
    name: str
    country: str


def test_more_requests_than_slots_with_mixed_sampling(batched_server):
    client = _client(batched_server)

    def ask(i: int):
        kw: dict = {"model": MODEL, "max_tokens": 40,
                    "messages": [{"role": "user", "content": f"Name city number {i}."}]}
        if i % 3 == 0:
            return "parse", client.chat.completions.parse(response_format=City, temperature=0,
                                                          **kw)
        if i % 3 == 1:
            return "logprobs", client.chat.completions.create(logprobs=True, top_logprobs=2,
                                                              temperature=0, **kw)
        return "sampled", client.chat.completions.create(temperature=0.9, seed=i, **kw)

    with ThreadPoolExecutor(7) as pool:
        results = list(pool.map(ask, range(7)))
    for kind, r in results:
        choice = r.choices[0]
        if kind == "parse":
            assert isinstance(choice.message.parsed, City)
        elif kind == "logprobs":
            assert len(choice.logprobs.content) == r.usage.completion_tokens
            assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
        else:
            assert choice.message.content


def test_an_abandoned_stream_frees_its_slot(batched_server):
    client = _client(batched_server)
    for _ in range(6):  # more abandoned streams than slots
        with httpx.stream("POST", batched_server.base_url + "/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "Count to 500."}],
                "max_tokens": 500, "stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"]:
                    break
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda p: _stream_text(client, p, 8), PROMPTS))
    assert all(texts)


def test_beyond_slots_and_queue_is_429(tmp_path):
    bundle = make_test_bundle(tmp_path / "bundle", engine={"n_parallel": 2, "n_ctx": 512},
                              server={"queue_size": 0})
    server = serve_bundle(bundle)
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Count to 900."}],
                "max_tokens": 400, "stream": True}
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as a, \
                    http.stream("POST", "/v1/chat/completions", json=body) as b:
                assert (a.status_code, b.status_code) == (200, 200)
                third = http.post("/v1/chat/completions", json=body)
                assert third.status_code == 429, third.text
                assert third.headers["retry-after"]
                assert third.json()["error"]["code"] == "queue_full"
    finally:
        server.stop()
