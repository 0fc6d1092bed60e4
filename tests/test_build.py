"""`edgepack build` end to end: real hub client on loopback, real llama.cpp conversion,
quantization, validation and inference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepack.cli.main import cli
from edgepack.manifest import load_manifest, verify_bundle

pytestmark = pytest.mark.slow
# Lowering a validation threshold explicitly is allowed, and the manifest must record it.
RANDOM = ("--min-agreement", "0.5")


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def build_tiny_for_laptop(local_hub, tiny_llama_dir, out: Path, *extra: str) -> Path:
    local_hub.add_repo("edgepack-test/tiny-llama", tiny_llama_dir)
    code, text = run("build", "edgepack-test/tiny-llama", "--device", "laptop-x86-16gb",
                     "--no-golden", "--out", str(out), *extra)
    assert code == 0, text
    return out / "tiny-llama-laptop-x86-16gb"


def _files(bundle: Path) -> dict[str, bytes]:
    return {
        p.relative_to(bundle).as_posix(): p.read_bytes() for p in bundle.rglob("*") if p.is_file()
    }


def test_tiny_llama_round_trip_through_the_hub(local_hub, tiny_llama_dir, tmp_path):
    sha = local_hub.add_repo("edgepack-test/tiny-llama", tiny_llama_dir)
    code, out = run(
        "build",
        "edgepack-test/tiny-llama@main",
        "--device",
        "raspberry-pi-5-8gb",
        "--out",
        str(tmp_path / "out"),
        "--no-golden",
        *RANDOM,
        "--bundle-version",
        "3",
    )
    assert code == 0, out
    bundle = tmp_path / "out" / "tiny-llama-raspberry-pi-5-8gb"
    m = verify_bundle(bundle)
    assert m["source"]["revision"] == sha and m["source"]["requested_revision"] == "main"
    assert set(m["source"]["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert m["bundle"] == {"name": "tiny-llama-raspberry-pi-5-8gb", "version": 3}
    assert m["device"]["profile_id"] == "raspberry-pi-5-8gb"
    assert m["device"]["profile_digest"].startswith("sha256:")
    assert m["plan"]["format"] == "gguf" and m["model"]["quant"] == m["plan"]["quant"]
    assert m["validation"]["passed"] is True and m["validation"]["threshold"] == 0.5
    assert m["engine"]["name"] == "llama.cpp"
    assert {f["path"] for f in m["files"]} == {
        m["model"]["path"],
        "sbom.cdx.json",
        "server.toml",
        "systemd/edgepack-server.service",
        "systemd/edgepack-agent.service",
    }
    # The bundle's model runs on the device engine.
    from llama_cpp import Llama

    llm = Llama(str(bundle / m["model"]["path"]), n_ctx=128, verbose=False)
    out_text = llm.create_completion("Hello", max_tokens=4, temperature=0)
    assert out_text["usage"]["completion_tokens"] >= 1
    # No weight file was fetched twice and nothing beyond what the build needs.
    fetched = {r.path.rsplit("/", 1)[-1] for r in local_hub.requests if "/resolve/" in r.path}
    assert "model.safetensors" in fetched


def test_smollm2_two_devices_two_quants_one_build(local_hub, smollm2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))  # prove a single conversion
    local_hub.add_repo("HuggingFaceTB/SmolLM2-135M-Instruct", smollm2_dir)
    code, out = run(
        "build",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "--device",
        "raspberry-pi-4-4gb",
        "--device",
        "laptop-x86-16gb",
        "--quant",
        "raspberry-pi-4-4gb=Q4_0",
        "--quant",
        "laptop-x86-16gb=Q8_0",
        "--out",
        str(tmp_path / "out"),
    )
    assert code == 0, out
    # One pull and one conversion serve both devices (a fresh cache, so it must convert).
    assert out.count("converting to") == 1, out
    # Q8_0 is validated again without flash attention from the same file, not quantized again
    assert out.count("quantizing to Q8_0") == 1 and "quantized earlier in this build" in out, out
    from llama_cpp import Llama

    for device, quant in (("raspberry-pi-4-4gb", "Q4_0"), ("laptop-x86-16gb", "Q8_0")):
        bundle = tmp_path / "out" / f"smollm2-135m-instruct-{device}"
        m = verify_bundle(bundle)
        assert m["model"]["quant"] == quant and m["model"]["kind"] == "chat"
        golden = m["validation"]["details"]["golden"]
        assert golden and all(g["passed"] for g in golden)
        assert m["golden_prompts"] == [
            {"prompt": "What is the capital of France?", "expect": "Paris"}
        ]
        llm = Llama(str(bundle / m["model"]["path"]), n_ctx=512, verbose=False)
        reply = llm.create_chat_completion(
            [{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24,
            temperature=0,
        )
        assert "Paris" in reply["choices"][0]["message"]["content"]
        del llm
    _serves_with_the_kernels_it_was_validated_with(tmp_path / "out")


def _serves_with_the_kernels_it_was_validated_with(out: Path) -> None:
    """Q4_0 answers "Paris" with flash attention; Q8_0's first answer token is a near-tie that
    flash attention turns to "L'Étoile…", so that bundle was validated, planned and is served
    without it (asked with --quant: the quant is the user's, the kernels are not). The server's
    own config reader and engine, on the build's real output, answer what was validated."""
    from edgepack.runtimes.config import load_server_config
    from edgepack.runtimes.engine import CancelToken, SamplingParams, TokenEvent
    from edgepack.runtimes.serve import make_engine

    for device, flash in (("raspberry-pi-4-4gb", True), ("laptop-x86-16gb", False)):
        bundle = out / f"smollm2-135m-instruct-{device}"
        m = load_manifest(bundle)
        assert m["plan"]["flash_attn"] is flash, m["plan"]
        assert m["validation"]["details"]["flash_attn"] is flash
        tried = m["plan"].get("step_up", [])
        if flash:
            assert not tried
        else:
            assert [(a["quant"], a["flash_attn"], a["failed"]) for a in tried] == \
                [("Q8_0", True, ["golden"])], tried
            assert any(line.startswith("flash attention off") for line in m["plan"]["rationale"])
        cfg = load_server_config(bundle, m)
        assert cfg.flash_attn is flash
        engine = make_engine(cfg)
        engine.load()
        try:
            prompt = engine.prepare_chat([{"role": "user",
                                           "content": "What is the capital of France?"}])
            params = SamplingParams(max_tokens=48, temperature=0.0)
            served = "".join(ev.text for ev in engine.generate(prompt, params, CancelToken())
                             if isinstance(ev, TokenEvent)).strip()
        finally:
            engine.close()
        assert served == m["validation"]["details"]["golden"][0]["answer"], served


def test_gguf_step_up_climbs_the_planners_ladder_and_lists_every_failed_attempt(
    local_hub, tiny_llama_dir, tmp_path
):
    """No --quant: the planner's choice fails validation, so the build steps up through the
    planner's GGUF table to its top (F16) and, when nothing passes, fails with exit 5 naming
    every attempt and the existing hint. A random-weight model cannot answer the golden
    question at any precision, so this is the all-fail path (no GGUF case where a tiny model
    fails low and passes high was found); the SmolLM2 ONNX test covers the step-up success."""
    local_hub.add_repo("edgepack-test/tiny-llama", tiny_llama_dir)
    code, text = run("build", "edgepack-test/tiny-llama", "--device", "laptop-x86-16gb",
                     "--golden", "What is the capital of France?=>Paris", *RANDOM,
                     "--out", str(tmp_path / "out"))
    assert code == 5, text
    flat = " ".join(text.split())  # the progress log and the error wrap long lines
    assert "plan for laptop-x86-16gb: gguf Q8_0" in flat
    # GGUF's summary gives every figure; only the golden prompt is named as the failed check.
    # Each quant is validated with flash attention (as served) and then without it.
    assert "Q8_0 failed validation with flash attention: top-token agreement" in flat, text
    assert "validating Q8_0 without it" in flat, text
    assert "Q8_0 failed validation: top-token agreement" in flat, text
    assert "golden prompt 'What is the capital of France?' answered '' without 'Paris'; " \
           "trying F16 (fits: " in flat, text
    assert "no gguf quantization for laptop-x86-16gb passed validation, stepping up from the " \
           "planned Q8_0: Q8_0 with flash attention (golden): top-token agreement" in flat, text
    assert "; Q8_0 (golden): top-token agreement" in flat, text
    assert "; F16 with flash attention (golden): top-token agreement" in flat, text
    assert "; F16 (golden): top-token agreement" in flat, text
    assert "--no-golden" in flat  # the validation's own hint, as without the step-up
    assert not (tmp_path / "out" / "tiny-llama-laptop-x86-16gb").exists()
    code, text = run("build", "edgepack-test/tiny-llama", "--device", "laptop-x86-16gb",
                     "--quant", "Q8_0", "--golden", "What is the capital of France?=>Paris",
                     *RANDOM, "--out", str(tmp_path / "out"))
    assert code == 5 and "trying" not in text and "stepping up" not in text, text
    # The planner's own checks still apply to a step-up: F16 (about 4,350 tok/s estimated)
    # misses an explicit floor that Q8_0 (about 6,270) meets, so it is refused, not built.
    code, text = run("build", "edgepack-test/tiny-llama", "--device", "laptop-x86-16gb",
                     "--min-tokens-per-second", "5000", "--golden",
                     "What is the capital of France?=>Paris", *RANDOM,
                     "--out", str(tmp_path / "out"))
    flat = " ".join(text.split())
    assert code == 5, text
    assert "; Q8_0 (golden): top-token agreement" in flat, text
    assert "; F16 with flash attention (plan): no gguf build of LlamaForCausalLM reaches " \
           "5000 tok/s" in flat, text
    assert "quantizing to F16" not in flat and "trying F16" not in flat, text


def test_build_is_reproducible_and_survives_offline(
    local_hub, tiny_llama_dir, tmp_path, monkeypatch
):
    local_hub.add_repo("edgepack-test/tiny-llama", tiny_llama_dir)
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache1"))
    args = [
        "build",
        "edgepack-test/tiny-llama",
        "--device",
        "laptop-x86-16gb",
        "--no-golden",
    ]
    assert run(*args, "--out", str(tmp_path / "a"))[0] == 0
    # A fresh edgepack cache (new conversion), the hub cache reused offline.
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    local_hub.clear_log()
    code, out = run(*args, "--out", str(tmp_path / "b"))
    assert code == 0, out
    assert local_hub.requests == []
    a = _files(tmp_path / "a" / "tiny-llama-laptop-x86-16gb")
    b = _files(tmp_path / "b" / "tiny-llama-laptop-x86-16gb")
    assert a == b


def test_tampered_bundle_fails_verify_with_exit_6(local_hub, tiny_llama_dir, tmp_path):
    bundle = build_tiny_for_laptop(local_hub, tiny_llama_dir, tmp_path / "out")
    assert run("verify", str(bundle))[0] == 0
    toml = bundle / "server.toml"
    toml.write_text(toml.read_text().replace("queue_size = 8", "queue_size = 9"))
    code, text = run("verify", str(bundle))
    assert code == 6 and "server.toml" in text and "sha256" in text
    (bundle / "stray.bin").write_bytes(b"x")
    code, text = run("verify", str(bundle))
    assert code == 6 and "stray.bin: not listed" in text


def test_inspect_human_and_json(local_hub, tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    build_tiny_for_laptop(local_hub, tiny_llama_dir, out, "--archive")
    bundle = out / "tiny-llama-laptop-x86-16gb"
    code, text = run("inspect", str(bundle))
    assert code == 0 and "validation" in text and "laptop-x86-16gb" in text
    code, text = run("inspect", str(bundle), "--json")
    assert json.loads(text) == load_manifest(bundle)
    # The archive unpacks to the same verified bundle.
    import tarfile

    with tarfile.open(out / "tiny-llama-laptop-x86-16gb.tar") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    verify_bundle(tmp_path / "unpacked" / "tiny-llama-laptop-x86-16gb")


def test_embedding_model_builds_to_gguf(local_hub, minilm_dir, tmp_path):
    local_hub.add_repo("sentence-transformers/all-MiniLM-L6-v2", minilm_dir)
    code, out = run(
        "build",
        "sentence-transformers/all-MiniLM-L6-v2",
        "--format",
        "gguf",
        "--device",
        "raspberry-pi-5-8gb",
        "--quant",
        "F16",
        "--out",
        str(tmp_path / "out"),
    )
    assert code == 0, out
    bundle = tmp_path / "out" / "all-minilm-l6-v2-raspberry-pi-5-8gb"
    m = verify_bundle(bundle)
    assert m["model"]["kind"] == "embedding"
    assert m["validation"]["passed"] and "cosine" in m["validation"]["metric"]
    # Against sentence-transformers itself, not only against the f32 intermediate.
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from edgepack.build.gguf_validate import embed_texts

    texts = ["The cat sits on the mat.", "Edge devices run small models."]
    ours = np.asarray(embed_texts(bundle / m["model"]["path"], texts))
    ref = SentenceTransformer(str(minilm_dir), device="cpu").encode(texts)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999, cos


@pytest.mark.parametrize(
    ("setup", "ref", "code", "needle"),
    [
        ("missing", "edgepack-test/nope", 4, "not found"),
        ("gated", "edgepack-test/gated", 4, "HF_TOKEN"),
        ("revision", "edgepack-test/tiny-llama@no-such-branch", 4, "no-such-branch"),
    ],
)
def test_pull_errors_exit_with_a_next_step(
    local_hub, tiny_llama_dir, tmp_path, setup, ref, code, needle
):
    if setup == "missing":
        local_hub.mark_missing("edgepack-test/nope")
    elif setup == "gated":
        local_hub.add_repo("edgepack-test/gated", tiny_llama_dir)
        local_hub.mark_gated("edgepack-test/gated")
    else:
        local_hub.add_repo("edgepack-test/tiny-llama", tiny_llama_dir)
    got, out = run("build", ref, "--device", "laptop-x86-16gb", "--out", str(tmp_path / "o"))
    assert got == code, out
    assert needle.lower() in out.lower()
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_unsupported_architecture_and_no_weights_exit_5(local_hub, tmp_path):
    unsupported = tmp_path / "unsupported"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(
        json.dumps({"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper"})
    )
    from support.hub import make_tiny_model

    make_tiny_model(unsupported)
    (unsupported / "config.json").write_text(
        json.dumps({"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper"})
    )
    code, out = run(
        "build", str(unsupported), "--device", "laptop-x86-16gb", "--out", str(tmp_path / "o")
    )
    assert code == 5, out
    assert "whisper" in out.lower() and "llama" in out.lower()  # names the supported ones

    empty = tmp_path / "noweights"
    shutil.copytree(unsupported, empty)
    for p in empty.glob("*.safetensors"):
        p.unlink()
    (empty / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    )
    code, out = run(
        "build", str(empty), "--device", "laptop-x86-16gb", "--out", str(tmp_path / "o")
    )
    assert code == 5, out
    assert "weights" in out.lower()


def test_bad_options_exit_2_before_any_work(tmp_path):
    code, out = run("build", "org/model", "--device", "laptop-x86-16gb", "--bundle-version", "1.x")
    assert code == 2 and "1.x" in out
    code, out = run(
        "build", "org/model", "--device", "laptop-x86-16gb", "--golden", "no arrow here"
    )
    assert code == 2 and "PROMPT=>EXPECTED" in out
    code, out = run("build", "org/model", "--device", "nope-device")
    assert code == 3 and "profiles list" in out
