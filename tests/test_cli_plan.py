"""``edgepack plan`` end to end: real hub client against the local hub, local folders, errors."""

from __future__ import annotations

import json

from click.testing import CliRunner

from edgepack.cli.main import cli


def run(*args: str):
    return CliRunner().invoke(cli, ["plan", *args])


def test_plan_through_local_hub_fetches_no_weights(local_hub, tiny_llama_dir):
    sha = local_hub.add_repo("acme/tiny-llama", tiny_llama_dir)
    r = run("acme/tiny-llama", "--device", "raspberry-pi-5-8gb", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    assert plan["source"] == {"ref": "acme/tiny-llama", "repo_id": "acme/tiny-llama", "sha": sha}
    assert (plan["format"], plan["engine"]) == ("gguf", "llama.cpp")
    assert plan["memory"]["required_bytes"] > plan["memory"]["weights_bytes"] > 0
    weights = [
        q for q in local_hub.requests if q.path.endswith(".safetensors") and q.method == "GET"
    ]
    assert weights, "the planner must read the safetensors header"
    size = (tiny_llama_dir / "model.safetensors").stat().st_size
    assert all(q.range is not None for q in weights)
    assert sum(q.bytes_sent for q in weights) < size / 4  # headers only, never the tensors


def test_plan_on_local_folders(minilm_dir, tiny_llama_dir):
    r = run(str(minilm_dir), "--device", "raspberry-pi-4-4gb", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["format"] == "onnx"
    r = run(str(tiny_llama_dir), "--device", "laptop-x86-16gb", "--quant", "Q4_0")
    assert r.exit_code == 0, r.output
    assert "Q4_0" in r.output and "as asked with --quant" in r.output
    r = run(str(tiny_llama_dir), "--device", "laptop-x86-16gb")
    assert r.exit_code == 0, r.output
    assert "rejected options" in r.output and "lower quality than Q8_0" in r.output


def test_cli_errors_map_to_exit_codes(tiny_llama_dir):
    r = run(str(tiny_llama_dir), "--device", "no-such-board")
    assert r.exit_code == 3 and "no-such-board" in r.output
    r = run(str(tiny_llama_dir), "--device", "laptop-x86-16gb", "--quant", "Q7_X")
    assert r.exit_code == 2 and "Q7_X" in r.output
    r = run(
        str(tiny_llama_dir), "--device", "laptop-x86-16gb", "--format", "onnx", "--quant", "Q4_0"
    )
    assert r.exit_code == 2
    r = run(str(tiny_llama_dir), "--device", "laptop-x86-16gb", "--ctx", "99999999")
    assert r.exit_code == 2 and "maximum context" in r.output


def _family(family: str, generation: int):
    import pytest
    from support.families import Transformers5Unavailable, family_checkpoint

    try:
        return family_checkpoint(family, generation)  # cached: written once per machine
    except Transformers5Unavailable as e:
        pytest.skip(f"transformers 5 cannot be installed here: {e}")


def test_plan_says_a_transformers5_checkpoint_builds_from_a_working_copy(local_hub):
    """The transformers-5 fixtures the compat tests build: plan names the working copy and the
    rewrites, in --json warnings and in the human output; transformers-4 files get no such
    warning."""
    llama5 = _family("llama", 5)
    r = run(str(llama5), "--device", "raspberry-pi-5-8gb", "--json")
    assert r.exit_code == 0, r.output
    (warning,) = [w for w in json.loads(r.output)["warnings"] if "working copy" in w]
    assert "saved by transformers 5.24.0" in warning
    assert "tokenizer_class TokenizersBackend -> PreTrainedTokenizerFast" in warning
    assert "rope_theta" in warning and "extra_special_tokens" in warning
    assert "tokenizer.model" not in warning  # a byte-level BPE tokenizer.json, read locally
    # a SentencePiece tokenizer saved as tokenizer.json only: tokenizer.model is rebuilt
    r = run(str(_family("gemma", 5)), "--device", "raspberry-pi-5-8gb", "--json")
    assert r.exit_code == 0, r.output
    (warning,) = [w for w in json.loads(r.output)["warnings"] if "working copy" in w]
    assert "tokenizer.model: rebuilt from tokenizer.json (SentencePiece)" in warning
    # human output, through the hub (tokenizer.json is not fetched to plan)
    local_hub.add_repo("acme/llama-tf5", llama5)
    r = run("acme/llama-tf5", "--device", "raspberry-pi-5-8gb")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "working copy" in text and "TokenizersBackend" in text
    for generation_4 in (_family("llama", 4), _family("gemma", 4)):
        r = run(str(generation_4), "--device", "raspberry-pi-5-8gb", "--json")
        assert r.exit_code == 0, r.output
        assert not any("working copy" in w for w in json.loads(r.output)["warnings"])


def test_local_measures_llamas_decode_rate_only_for_a_gguf_plan(minilm_dir, tiny_llama_dir):
    """``--device local`` runs llama.cpp's compute probe (seconds, then cached) only when the
    plan is GGUF: an embedding model planned for ONNX never pays for it."""
    import os
    from pathlib import Path

    home = Path(os.environ["EDGEPACK_HOME"])  # a fresh one per test (conftest)
    r = run(str(minilm_dir), "--device", "local", "--json")
    assert r.exit_code == 0, r.output
    onnx = json.loads(r.output)
    assert onnx["format"] == "onnx" and "decode_gflops" not in onnx["device"]
    assert not (home / "compute.json").exists()
    r = run(str(tiny_llama_dir), "--device", "local", "--json")
    assert r.exit_code == 0, r.output
    gguf = json.loads(r.output)
    assert gguf["format"] == "gguf"
    assert gguf["device"]["compute_basis"].startswith("measured"), gguf["device"]
    # stored for the next plan, unless other jobs held the CPUs while it ran
    assert (home / "compute.json").exists() or "while busy" in gguf["device"]["compute_basis"]
