"""Server lifecycle over real HTTP: readiness across a slow load, API keys, backpressure,
client disconnects, SIGTERM drain with systemd notifications, and refusing bad bundles.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from edgepack.runtimes.config import TEST_HOOK_LOAD_DELAY
from prometheus_client.parser import text_string_to_metric_families
from support.bundles import make_test_bundle, serve_bundle

MODEL = "smollm2-135m-instruct"
LONG = {"model": MODEL, "prompt": "List the numbers from one to one thousand:",
        "temperature": 0}


def _metric(base_url: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(httpx.get(base_url + "/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def _wait_for(predicate, what: str, timeout: float = 60):
    # Polls a condition; the deadline only bounds a hung test, it asserts no timing.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_readiness_is_503_while_loading_then_200(chat_bundle):
    server = serve_bundle(chat_bundle, env={TEST_HOOK_LOAD_DELAY: "3"}, ready=False)
    try:
        ready = httpx.get(server.base_url + "/readyz")
        assert ready.status_code == 503
        assert ready.json() == {"status": "loading"}
        assert httpx.get(server.base_url + "/healthz").status_code == 200
        chat = httpx.post(server.base_url + "/v1/chat/completions",
                          json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 503
        assert chat.json()["error"]["code"] == "loading"
        assert chat.headers["retry-after"] == "1"
        server.wait_ready()
        assert httpx.get(server.base_url + "/readyz").json()["status"] == "ready"
    finally:
        assert server.stop() == 0


@pytest.mark.slow
def test_api_key_guards_v1_but_not_probes(chat_bundle):
    server = serve_bundle(chat_bundle, env={"EDGEPACK_API_KEY": "s3cret"})
    try:
        url = server.base_url
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.models.list()
        assert e.value.status_code == 401
        assert e.value.body["code"] == "invalid_api_key"
        bare = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert bare.status_code == 401
        assert bare.json()["error"]["type"] == "invalid_request_error"
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices
        for path in ("/healthz", "/readyz", "/metrics"):
            assert httpx.get(url + path).status_code == 200
        assert "access-control-allow-origin" not in httpx.get(
            url + "/healthz", headers={"Origin": "http://evil.example"}).headers
    finally:
        server.stop()


@pytest.mark.slow
def test_flood_gets_only_200_and_429_then_recovers(chat_bundle):
    server = serve_bundle(chat_bundle, "--queue-size", "2")
    try:
        url = server.base_url + "/v1/completions"
        body = {"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 8,
                "temperature": 0}
        with ThreadPoolExecutor(30) as pool:
            responses = list(pool.map(lambda _: httpx.post(url, json=body, timeout=120),
                                      range(30)))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) <= {200, 429}, statuses
        assert 200 in statuses and 429 in statuses, statuses
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["code"] == "queue_full"
        rejected = _metric(server.base_url, "edgepack_rejected_requests_total",
                           reason="queue_full")
        assert rejected == statuses.count(429)
        # Recovered: the queue is empty and the next request is served.
        assert _metric(server.base_url, "edgepack_queue_depth") == 0
        assert httpx.post(url, json=body, timeout=120).status_code == 200
        assert server.proc.poll() is None
    finally:
        assert server.stop() == 0


@pytest.mark.slow
def test_client_disconnect_stops_generation(chat_server):
    base = chat_server.base_url
    before_out = _metric(base, "edgepack_completion_tokens_total")
    with httpx.stream("POST", base + "/v1/completions",
                      json={**LONG, "max_tokens": 1500, "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert all(line.startswith("data: ") or not line for line in got)
    # The engine records the generation as ended by the disconnect...
    _wait_for(lambda: _metric(base, "edgepack_generations_total",
                              reason="client_disconnected") >= 1, "the cancelled generation")
    assert _metric(base, "edgepack_running_requests") == 0
    # ...long before max_tokens: it stopped, it did not run on in the background.
    produced = _metric(base, "edgepack_completion_tokens_total") - before_out
    assert 3 <= produced < 1500
    r = httpx.post(base + "/v1/completions", json={**LONG, "max_tokens": 3}, timeout=60)
    assert r.json()["usage"]["completion_tokens"] == 3


def _notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    return sock, path


@pytest.mark.slow
def test_sigterm_drains_in_flight_and_exits_0(chat_bundle, tmp_path):
    notify, path = _notify_socket(tmp_path)
    server = serve_bundle(chat_bundle, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"},
                          ready=False)
    try:
        messages: list[str] = []
        while not {"READY=1", "WATCHDOG=1"} <= set(messages):
            messages += notify.recv(4096).decode().split("\n")
        assert httpx.get(server.base_url + "/readyz").status_code == 200
        result: dict = {}

        def long_request():
            r = httpx.post(server.base_url + "/v1/completions",
                           json={**LONG, "max_tokens": 64}, timeout=120)
            result["status"], result["body"] = r.status_code, r.json()

        t = threading.Thread(target=long_request)
        t.start()
        _wait_for(lambda: _metric(server.base_url, "edgepack_running_requests") == 1,
                  "the request to reach the engine")
        server.proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: "STOPPING=1" in notify.recv(4096).decode(), "STOPPING=1")
        t.join(120)
        assert result["status"] == 200
        body = result["body"]
        assert body["usage"]["completion_tokens"] == 64 or \
            body["choices"][0]["finish_reason"] == "stop"
        assert server.proc.wait(60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(server.base_url + "/healthz")
    finally:
        server.stop()
        notify.close()


@pytest.mark.slow
def test_drain_deadline_ends_a_long_generation_with_503_not_500(tmp_path):
    bundle = make_test_bundle(tmp_path / "short-drain", server={"drain_seconds": 2})
    server = serve_bundle(bundle)
    try:
        result: dict = {}

        def endless():
            r = httpx.post(server.base_url + "/v1/completions",
                           json={**LONG, "max_tokens": 4000}, timeout=120)
            result["status"], result["body"] = r.status_code, r.json()
            result["retry_after"] = r.headers.get("retry-after")

        t = threading.Thread(target=endless)
        t.start()
        _wait_for(lambda: _metric(server.base_url, "edgepack_running_requests") == 1,
                  "the request to reach the engine")
        server.proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert result["status"] == 503, result["body"]
        assert result["body"]["error"]["code"] == "shutting_down"
        assert result["retry_after"] == "1"
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def _serve_exit(bundle, tmp_path) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "edgepack", "serve", str(bundle), "--port",
                        "0"], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stderr


def test_tampered_bundle_refuses_to_start_with_exit_6(chat_bundle, tmp_path):
    bundle = tmp_path / "tampered"
    shutil.copytree(chat_bundle, bundle, copy_function=os.link)
    toml = bundle / "server.toml"
    text = toml.read_text()
    toml.unlink()  # a new inode: the shared, hard-linked original stays intact
    toml.write_text(text.replace("n_threads = 1", "n_threads = 3"))
    code, err = _serve_exit(bundle, tmp_path)
    assert code == 6, err
    assert "server.toml" in err and "sha256" in err


def test_unloadable_model_exits_7(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 4096)
    bundle = make_test_bundle(tmp_path / "bundle", junk)
    code, err = _serve_exit(bundle, tmp_path)
    assert code == 7, err
    assert "junk" in err or "could not load" in err


def test_missing_bundle_is_integrity_error(tmp_path):
    code, err = _serve_exit(tmp_path / "nope", tmp_path)
    assert code == 6, err
    assert "manifest" in err or "not a directory" in err


def test_device_modules_do_not_import_build_side():
    code = (
        "import sys, edgepack.runtimes.app, edgepack.runtimes.serve, "
        "edgepack.runtimes.llama_engine, edgepack.runtimes.systemd, edgepack.cli.serve\n"
        "bad = sorted(m for m in ('torch', 'transformers', 'optimum', 'huggingface_hub') "
        "if m in sys.modules)\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert json.loads(out.replace("'", '"')) == []
