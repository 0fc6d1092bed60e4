"""`edgepack serve A B`: an LLM (GGUF) and an embedding model (ONNX) in one process, the
on-device RAG setup, over real HTTP with the official openai client.

The chat bundle is SmolLM2-135M-Instruct Q4_1 (the shipped GGUF); the embedding bundle is a
real `edgepack build` of all-MiniLM-L6-v2 to ONNX int8 for a Raspberry Pi 5 (export,
quantization and validation run once per module).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
import numpy as np
import openai
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from support.bundles import minilm_folder, serve_bundle

from edgepack.cli.main import cli

pytestmark = pytest.mark.slow
CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def embed_bundle(tmp_path_factory):
    """A real ONNX int8 bundle of all-MiniLM-L6-v2 built by `edgepack build`."""
    root = tmp_path_factory.mktemp("several")
    src = root / EMBED  # the folder's name becomes the model id
    shutil.copytree(minilm_folder(), src, copy_function=os.link)
    result = CliRunner().invoke(cli, ["build", str(src), "--device", "raspberry-pi-5-8gb",
                                      "--out", str(root / "out")])
    assert result.exit_code == 0, result.output
    return root / "out" / f"{EMBED}-raspberry-pi-5-8gb"


@pytest.fixture(scope="module")
def both(chat_bundle, embed_bundle):
    server = serve_bundle(chat_bundle, str(embed_bundle))
    yield server
    assert server.stop() == 0


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def test_chat_and_embeddings_through_one_server(both, minilm_dir):
    client = _client(both)
    assert [m.id for m in client.models.list().data] == [CHAT, EMBED]
    assert client.models.retrieve(EMBED).id == EMBED
    answer = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Say hello."}], max_tokens=12,
        temperature=0)
    assert answer.model == CHAT
    assert answer.choices[0].message.content.strip()
    assert 0 < answer.usage.completion_tokens <= 12
    texts = ["Paris is the capital of France.", "The cat sits on the mat."]
    got = client.embeddings.create(model=EMBED, input=texts)
    assert got.model == EMBED
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(minilm_dir), device="cpu").encode(texts)
    ours = np.array([d.embedding for d in got.data])
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.99, cos
    # Each model does only what it is: no silent routing of a chat to the embedding model.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=EMBED, messages=[{"role": "user",
                                                                "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=CHAT, input=["hi"])


def test_unknown_model_is_a_404_naming_the_served_ones(both):
    client = _client(both)
    for call in (
        lambda: client.chat.completions.create(model="gpt-4o", messages=[
            {"role": "user", "content": "hi"}]),
        lambda: client.embeddings.create(model="text-embedding-3-small", input=["hi"]),
        lambda: client.models.retrieve("gpt-4o"),
    ):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["code"] == "model_not_found"
        assert CHAT in e.value.body["message"] and EMBED in e.value.body["message"]


def test_readiness_per_model_and_metrics_labelled_by_model(both):
    ready = httpx.get(both.base_url + "/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    by_name = {m["model"]: m for m in body["models"]}
    assert set(by_name) == {CHAT, EMBED}
    assert by_name[CHAT]["config"]["format"] == "gguf"
    assert by_name[EMBED]["config"]["format"] == "onnx"
    assert all(m["status"] == "ready" and len(m["sha256"]) == 64 for m in body["models"])
    _client(both).embeddings.create(model=EMBED, input=["one", "two"])
    samples = {}
    for family in text_string_to_metric_families(httpx.get(both.base_url + "/metrics").text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("edgepack_ready", ())] == 1
    for name in (CHAT, EMBED):
        assert samples[("edgepack_model_ready", (("model", name),))] == 1
    assert samples[("edgepack_prompt_tokens_total", (("model", EMBED),))] > 0
    models = {dict(k[1]).get("model") for k in samples if dict(k[1]).get("model")}
    assert models == {CHAT, EMBED}  # the label's values: the loaded models, nothing else


def test_readiness_waits_for_every_model(chat_bundle, embed_bundle):
    """One model still loading keeps the whole server 503, and /readyz says which."""
    server = serve_bundle(chat_bundle, str(embed_bundle), ready=False,
                          env={"EDGEPACK_TEST_HOOK_LOAD_DELAY_SECONDS": "3"})
    try:
        r = httpx.get(server.base_url + "/readyz")
        assert r.status_code == 503
        assert {m["status"] for m in r.json()["models"]} == {"loading"}
        server.wait_ready()
    finally:
        assert server.stop() == 0


def _needs(chat_bundle, embed_bundle) -> tuple[int, int]:
    embed = json.loads((embed_bundle / "manifest.json").read_text())["plan"]["memory"]
    # The chat test bundle was assembled without the planner: its model file stands in.
    chat = next((chat_bundle / "model").glob("*.gguf")).stat().st_size
    return chat, embed["required_bytes"]


def _serve(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgepack", "serve", *args, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_memory_for_all_bundles_is_checked_together_before_loading(chat_bundle, embed_bundle):
    chat, embed = _needs(chat_bundle, embed_bundle)
    assert max(chat, embed) < chat + embed - 1  # each alone would fit the budget below
    p = _serve(str(chat_bundle), str(embed_bundle), "--memory-budget-bytes",
               str(chat + embed - 1))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 7, err
    assert out == ""  # refused before binding or loading anything
    assert "not enough memory" in err and "together" in err
    assert CHAT in err and EMBED in err and "--memory-budget-bytes" in err
    # Exactly the sum fits: the server gets past the check and listens.
    p = _serve(str(chat_bundle), str(embed_bundle), "--memory-budget-bytes",
               str(chat + embed))
    try:
        assert "http://127.0.0.1:" in p.stdout.readline()
    finally:
        p.terminate()
        p.communicate(timeout=60)


def test_what_several_bundles_cannot_share_is_refused(chat_bundle, embed_bundle):
    p = _serve(str(chat_bundle), str(embed_bundle), "--ctx", "1024")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "--ctx" in err
    p = _serve(str(chat_bundle), str(chat_bundle))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 3 and f"both serve model {CHAT!r}" in err
