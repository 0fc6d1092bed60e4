"""`serve` tells the truth about what runs: the verified bytes, the device's real engine, the
effective configuration (issue #13 Medium 6 + operability, issue #11 item 3).

Real server processes on 127.0.0.1; the Jetson bundle is a real `edgepack build` for
jetson-orin-nano-8gb on this CPU-only machine, whose llama-cpp-python has no GPU offload.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import llama_cpp
import pytest
from click.testing import CliRunner
from edgepack.runtimes.config import TEST_HOOK_LOAD_DELAY
from edgepack.runtimes.engine_check import usable_cores
from support.bundles import make_test_bundle, serve_bundle

from edgepack.cli.main import cli
from edgepack.manifest import load_manifest

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-instruct"


def _serve_exit(bundle, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "edgepack", "serve", str(bundle), "--port", "0",
                        *args], capture_output=True, text=True, timeout=180,
                       env={**os.environ, **(env or {})})
    return p.returncode, p.stderr


def test_model_swapped_after_verify_is_not_what_loads(tmp_path):
    # The attack: replace the model file between verification and load. The load waits 3 s
    # (test hook), the file is swapped for junk meanwhile; loading by name would fail (exit 7)
    # or serve the junk, loading the verified descriptor serves the original.
    bundle = make_test_bundle(tmp_path / "b")
    manifest = load_manifest(bundle)
    rel = manifest["model"]["path"]
    server = serve_bundle(bundle, env={TEST_HOOK_LOAD_DELAY: "3"}, ready=False)
    try:
        (bundle / rel).unlink()  # the fixture hard-links: a new inode, the original survives
        (bundle / rel).write_bytes(b"GGUF" + b"\0" * 4096)
        server.wait_ready()
        ready = httpx.get(server.base_url + "/readyz").json()
        assert ready["sha256"] == manifest["model"]["sha256"]
        assert ready["config"]["model_source"] == f"verified descriptor of {rel}"
        r = httpx.post(server.base_url + "/v1/completions",
                       json={"model": MODEL, "prompt": "The capital of France is",
                             "max_tokens": 4, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"].strip()
    finally:
        server.stop()


def _swap(path, data: bytes) -> None:
    path.unlink()  # a new inode at the name; the verified one stays open in the server
    path.write_bytes(data)


def test_onnx_files_swapped_after_verify_are_not_what_loads(local_hub, tiny_llama_dir,
                                                             tmp_path):
    # The same attack on the ONNX engine, which loads the graph from a private folder of
    # links to the verified descriptors (and the tokenizer likewise): swapping the graph, or
    # the tokenizer, by name during the load delay changes nothing that runs.
    local_hub.add_repo("edgepack-test/tiny-llama", tiny_llama_dir)
    built = CliRunner().invoke(cli, [
        "build", "edgepack-test/tiny-llama", "--format", "onnx", "--device", "laptop-x86-16gb",
        "--quant", "int8", "--no-golden", "--out", str(tmp_path / "out")])
    assert built.exit_code == 0, built.output
    bundle = tmp_path / "out" / "tiny-llama-laptop-x86-16gb"
    manifest = load_manifest(bundle)
    rel = manifest["model"]["path"]
    listed = [f["path"] for f in manifest["files"]]
    n_model = sum(p.startswith("model/") for p in listed)
    n_tok = sum(p.startswith("tokenizer/") for p in listed)
    assert "tokenizer/tokenizer.json" in listed and n_tok > 1
    body = {"model": manifest["model"]["name"], "prompt": "Hello", "max_tokens": 4,
            "temperature": 0}
    texts = []
    for swapped in (rel, "tokenizer/tokenizer.json"):
        original = (bundle / swapped).read_bytes()
        server = serve_bundle(bundle, env={TEST_HOOK_LOAD_DELAY: "3"}, ready=False)
        try:
            _swap(bundle / swapped, b"junk swapped in after verification\n")
            server.wait_ready()
            ready = httpx.get(server.base_url + "/readyz").json()
            assert ready["sha256"] == manifest["model"]["sha256"]
            assert ready["config"]["model_source"] == (
                f"verified descriptors of model/ ({n_model} files) and tokenizer/ ({n_tok} "
                "files)")
            r = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
        finally:
            server.stop()
            _swap(bundle / swapped, original)
    assert texts[0] == texts[1]  # greedy: the same verified graph and tokenizer both times
    # By name, the junk is what a fresh server would find: refused before loading.
    _swap(bundle / rel, b"junk")
    code, err = _serve_exit(bundle)
    assert code == 6 and rel in err, err


def test_jetson_gguf_bundle_exit_7_then_cpu_serves(local_hub, tiny_llama_dir, tmp_path):
    assert not llama_cpp.llama_supports_gpu_offload(), "this test needs a CPU-only engine"
    local_hub.add_repo("edgepack-test/tiny-llama", tiny_llama_dir)
    built = CliRunner().invoke(cli, [
        "build", "edgepack-test/tiny-llama", "--device", "jetson-orin-nano-8gb", "--format",
        "gguf", "--no-golden", "--min-agreement", "0.5", "--out", str(tmp_path / "out")])
    assert built.exit_code == 0, built.output
    bundle = tmp_path / "out" / "tiny-llama-jetson-orin-nano-8gb"
    gpu_layers = load_manifest(bundle)["plan"]["gpu_layers"]
    assert gpu_layers > 0, "the plan for a Jetson should offload layers"

    code, err = _serve_exit(bundle)
    assert code == 7, err
    assert "GPU layers" in err and "CUDA build of llama-cpp-python" in err and "--cpu" in err

    server = serve_bundle(bundle, "--cpu", "--log-level", "info")
    try:
        ready = httpx.get(server.base_url + "/readyz").json()
        assert ready["compute"] == "cpu"
        assert ready["config"]["n_gpu_layers"] == 0
        assert any("--cpu" in a and str(gpu_layers) in a
                   for a in ready["config"]["adjustments"]), ready
        assert "compute: cpu (--cpu)" in server.first_line
    finally:
        server.stop()
    assert "serving on the CPU (--cpu)" in server.log_path.read_text()


def test_threads_above_the_cores_are_clamped_with_a_warning(tmp_path):
    bundle = make_test_bundle(tmp_path / "b", engine={"n_threads": 512})
    server = serve_bundle(bundle, "--log-level", "info")
    try:
        cfg = httpx.get(server.base_url + "/readyz").json()["config"]
    finally:
        server.stop()
    assert cfg["n_threads"] == usable_cores() < 512
    assert "n_threads 512 lowered to" in server.log_path.read_text()


def test_local_config_and_env_layer_over_the_bundle(tmp_path):
    bundle = make_test_bundle(tmp_path / "b")
    local = tmp_path / "server.toml"
    local.write_text('[server]\napi_key = "from-file"\nqueue_size = 3\n'
                     'cors_origins = ["http://ui.local"]\n[engine]\nn_ctx = 512\n')
    server = serve_bundle(bundle, "--config", str(local), "--log-format", "json",
                          "--log-level", "info", env={"EDGEPACK_QUEUE_SIZE": "5"})
    try:
        cfg = httpx.get(server.base_url + "/readyz").json()["config"]
        assert cfg["config_file"] == str(local)
        assert cfg["n_ctx"] == 512 and cfg["cors_origins"] == ["http://ui.local"]
        assert cfg["queue_size"] == 5  # the variable beats the file
        assert cfg["api_key"] == "set"
        models = httpx.get(server.base_url + "/v1/models")
        assert models.status_code == 401
        ok = httpx.get(server.base_url + "/v1/models",
                       headers={"authorization": "Bearer from-file",
                                "x-request-id": "req-42"})
        assert ok.status_code == 200
        done = httpx.post(server.base_url + "/v1/completions",
                          json={"model": MODEL, "prompt": "One, two,", "max_tokens": 3,
                                "temperature": 0},
                          headers={"authorization": "Bearer from-file",
                                   "x-request-id": "req-43"}, timeout=60)
        assert done.status_code == 200 and done.headers["x-request-id"] == "req-43"
        time.sleep(0.2)
    finally:
        server.stop()
    lines = [json.loads(x) for x in server.log_path.read_text().splitlines() if x.startswith("{")]
    access = [x for x in lines if x.get("request_id") == "req-42"]
    assert access and access[0]["route"] == "/v1/models" and access[0]["status"] == 200
    assert {"method", "duration_ms", "path"} <= access[0].keys()
    gen = [x for x in lines if x.get("request_id") == "req-43"]
    assert gen and gen[0]["route"] == "/v1/completions" and gen[0]["method"] == "POST"
    assert gen[0]["completion_tokens"] == 3 and gen[0]["prompt_tokens"] > 0
    assert any(x["message"].startswith("effective config:") for x in lines)


def test_local_config_cannot_change_the_model(tmp_path):
    bundle = make_test_bundle(tmp_path / "b")
    local = tmp_path / "server.toml"
    local.write_text('[model]\npath = "/tmp/other.gguf"\n')
    code, err = _serve_exit(bundle, "--config", str(local))
    assert code == 3, err
    assert "[model] cannot be overridden" in err
    local.write_text('[server]\nqueue_sise = 3\n')
    code, err = _serve_exit(bundle, "--config", str(local))
    assert code == 3 and "queue_sise is not a setting" in err, err
    # the attention kernels are what the build validated the answers with: not a device knob
    local.write_text('[engine]\nflash_attn = true\n')
    code, err = _serve_exit(bundle, "--config", str(local))
    assert code == 3 and "flash_attn is the bundle's own setting" in err, err
