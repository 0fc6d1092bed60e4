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
from support.bundles import make_test_bundle, minilm_folder, serve_bundle

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
    models = {dict(k[1]).get("model") for k in samples
              if dict(k[1]).get("model") and not k[0].startswith("edgepack_request")}
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


# -- per-model settings in the device-local config file (issue #14) ---------------------------


def _config(tmp_path, text: str) -> str:
    path = tmp_path / "server.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def _by_model(server) -> dict:
    return {m["model"]: m for m in httpx.get(server.base_url + "/readyz").json()["models"]}


def test_per_model_tables_reach_each_engine(chat_bundle, embed_bundle, tmp_path):
    """[models."ID".engine] sets one model's context and threads; [engine] the rest."""
    config = _config(tmp_path, f"""
[engine]
n_threads = 2
n_ctx = 512

[models.{EMBED}.engine]
n_ctx = 64
n_threads = 1
""")
    server = serve_bundle(chat_bundle, str(embed_bundle), "--config", config)
    try:
        models = _by_model(server)
        # n_ctx as the engines report it (llama.cpp's and the ONNX tokenizer's window).
        assert (models[CHAT]["n_ctx"], models[EMBED]["n_ctx"]) == (512, 64)
        assert models[CHAT]["config"]["n_threads"] == 2
        assert models[EMBED]["config"]["n_threads"] == 1
        assert models[EMBED]["config"]["config_file"] == config
        text = "word " * 100  # ~100 tokens for both tokenizers: over 64, under 512
        r = httpx.post(server.base_url + "/v1/embeddings", timeout=120,
                       json={"model": EMBED, "input": text})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert "context is 64" in r.json()["error"]["message"]
        r = httpx.post(server.base_url + "/v1/completions", timeout=120, json={
            "model": CHAT, "prompt": text, "max_tokens": 1})
        assert r.status_code == 200, r.text
        assert [m.id for m in _client(server).models.list().data] == [CHAT, EMBED]
    finally:
        assert server.stop() == 0


def _start_line(*args: str, env: dict | None = None) -> str:
    """The server's start line (settled before any model loads); the server is then stopped."""
    p = subprocess.Popen([sys.executable, "-m", "edgepack", "serve", *args, "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **(env or {})})
    try:
        return p.stdout.readline()
    finally:
        p.terminate()
        p.communicate(timeout=60)


def test_flags_and_variables_win_over_per_model_tables(chat_bundle, embed_bundle, tmp_path):
    config = _config(tmp_path, f"""
[engine]
n_threads = 2
[models.{CHAT}.engine]
n_threads = 1
n_ctx = 256
""")
    bundles = (str(chat_bundle), str(embed_bundle), "--config", config)
    line = _start_line(*bundles)
    assert f"{CHAT}: threads: 1  ctx: 256" in line and f"{EMBED}: threads: 2" in line, line
    # The command line is the most explicit layer: --threads applies to every model, over
    # the per-model table as over [engine]; what the flag does not name stays per model.
    line = _start_line(*bundles, "--threads", "2")
    assert f"{CHAT}: threads: 2  ctx: 256" in line and f"{EMBED}: threads: 2" in line, line
    line = _start_line(*bundles, env={"EDGEPACK_THREADS": "2"})
    assert f"{CHAT}: threads: 2  ctx: 256" in line, line


@pytest.mark.parametrize(("text", "expect"), [
    ('[models."gpt-4o".engine]\nn_ctx = 1024\n',
     ["'gpt-4o'", "does not serve", repr(CHAT), repr(EMBED)]),
    (f'[models.{CHAT}.server]\nport = 9000\n', ["server-wide", "[server]"]),
    (f'[models.{CHAT}.engine]\nn_ctx = "big"\n', [f'[models."{CHAT}".engine] n_ctx', "int"]),
    (f'[models.{CHAT}.engine]\ncontext = 1024\n', ["context is not a setting", "n_ctx"]),
    # a well-typed value no engine can run with: the error names the model and the file
    (f'[models.{EMBED}.engine]\nn_ctx = 8\n', [f"model {EMBED!r}", "n_ctx = 8 is too small",
                                              "server.toml, EDGEPACK_* variables"]),
])
def test_bad_per_model_tables_are_config_errors(chat_bundle, embed_bundle, tmp_path, text,
                                                 expect):
    p = _serve(str(chat_bundle), str(embed_bundle), "--config", _config(tmp_path, text))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 3, err
    assert out == ""  # refused before binding or loading anything
    for part in expect:
        assert part in err, err


def test_ctx_refusal_points_at_the_per_model_table(chat_bundle, embed_bundle):
    p = _serve(str(chat_bundle), str(embed_bundle), "--ctx", "1024")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2
    assert '[models."<model id>".engine] n_ctx' in err, err


def test_memory_check_uses_each_models_own_context(chat_bundle, embed_bundle, tmp_path):
    """A per-model n_ctx rescales that model's planned KV cache in the check for all models.

    The chat bundle's memory figures are the planner's own, as a build writes them: SmolLM2-135M's
    shape at Q4_0 (the planner's nearest to the shipped Q4_1 file), ctx 2048, one slot."""
    from support.configs import CONFIGS, synth_tensors

    from edgepack.device.resolve import load_profile
    from edgepack.plan.facts import model_facts
    from edgepack.plan.planner import PlanOptions, plan_build

    cfg = CONFIGS["SmolLM2-135M"]
    plan = plan_build(model_facts(cfg, synth_tensors(cfg)), load_profile("laptop-x86-16gb"),
                      PlanOptions(quant="Q4_0", ctx=2048, parallel=1))
    mem = plan.to_dict()["memory"]
    kv = mem["kv_cache_bytes"]
    assert kv == 2 * 30 * 3 * 64 * 2 * 2048  # llama.cpp's F16 KV cache for this shape
    planned = make_test_bundle(tmp_path / "planned", engine={"n_ctx": 2048}, plan_memory={
        "required_bytes": mem["required_bytes"], "kv_cache_bytes": kv})
    _, embed = _needs(chat_bundle, embed_bundle)
    # fits only with the chat model at ctx 1024
    budget = str(mem["required_bytes"] - kv // 2 + embed)
    p = _serve(str(planned), str(embed_bundle), "--memory-budget-bytes", budget)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 7, err
    assert "not enough memory" in err
    half = _config(tmp_path, f"[models.{CHAT}.engine]\nn_ctx = 1024\n")
    p = _serve(str(planned), str(embed_bundle), "--memory-budget-bytes", budget,
               "--config", half, "--log-level", "info")
    try:
        assert "http://127.0.0.1:" in p.stdout.readline()
    finally:
        p.terminate()
        _, err = p.communicate(timeout=60)
    assert "rescaled from 2048 to 1024 cells (ctx 1024" in err, err


# -- request metrics per model ----------------------------------------------------------------


def _requests(server) -> dict:
    out = {}
    for family in text_string_to_metric_families(httpx.get(server.base_url + "/metrics").text):
        for s in family.samples:
            if s.name in ("edgepack_requests_total", "edgepack_request_duration_seconds_count"):
                out[(s.name, s.labels["route"], s.labels.get("status"), s.labels["model"])] = (
                    s.value)
    return out


def test_request_metrics_carry_the_model(both):
    before = _requests(both)
    client = _client(both)
    client.completions.create(model=CHAT, prompt="1, 2, 3,", max_tokens=2, temperature=0)
    client.embeddings.create(model=EMBED, input=["one"])
    client.embeddings.create(model=EMBED, input=["two"])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="attacker-chosen-" + "x" * 40, input=["hi"])
    assert httpx.get(both.base_url + "/healthz").status_code == 200
    after = _requests(both)
    delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    total, count = "edgepack_requests_total", "edgepack_request_duration_seconds_count"
    assert delta[(total, "/v1/completions", "200", CHAT)] == 1
    assert delta[(total, "/v1/embeddings", "200", EMBED)] == 2
    assert delta[(total, "/v1/embeddings", "404", "(unknown)")] == 1
    assert delta[(total, "/healthz", "200", "")] == 1
    assert delta[(count, "/v1/embeddings", None, EMBED)] == 2
    assert delta[(count, "/v1/completions", None, CHAT)] == 1
    # Bounded: the served ids and the two fixed values, never what a client sent.
    assert {k[3] for k in after} <= {CHAT, EMBED, "", "(unknown)"}
