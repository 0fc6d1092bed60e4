"""The test models are what they claim to be: loadable, tokenized like the original, answering."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from support import models

TEXT = "In 2024, the Eiffel Tower's 330 metres of iron drew 6.3 million visitors!  Café <|im_end|>"


def test_tiny_llama_is_small_llama_with_chat_template(tiny_llama_dir: Path) -> None:
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert (tiny_llama_dir / "model.safetensors").is_file()
    assert "<|im_start|>" in (tiny_llama_dir / "chat_template.jinja").read_text()


@pytest.mark.slow
def test_parallel_builds_share_one_deterministic_result(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    results: list[Path] = []
    builds = [
        threading.Thread(target=lambda: results.append(models.build_tiny_llama(root=tmp_path)))
        for _ in range(2)
    ]
    for t in builds:
        t.start()
    for t in builds:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    # Only the finished folder and the lock file remain: no temporary build folders.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny-llama.lock", results[0].name]
    # A fixed seed: a build in another cache root has the same weights byte for byte.
    assert (results[0] / "model.safetensors").read_bytes() == (
        tiny_llama_dir / "model.safetensors"
    ).read_bytes()


@pytest.mark.slow
def test_smollm2_tokenizer_matches_llama_cpp(smollm2_dir: Path) -> None:
    """The rebuilt HF tokenizer splits text exactly as llama.cpp does with the shipped GGUF."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    llm = Llama(str(models.smollm2_gguf_path()), n_ctx=256, vocab_only=True, verbose=False)
    try:
        expected = llm.tokenize(TEXT.encode(), add_bos=False, special=True)
    finally:
        llm.close()
    assert tok(TEXT)["input_ids"] == expected
    assert tok.decode(expected) == TEXT


@pytest.mark.slow
def test_smollm2_answers_capital_of_france(smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["torch_dtype" if "torch_dtype" in config else "dtype"] == "float32"
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_minilm_is_the_shipped_sentence_transformer(minilm_dir: Path) -> None:
    config = json.loads((minilm_dir / "config.json").read_text())
    assert config["model_type"] == "bert"
    assert (minilm_dir / "model.safetensors").is_file()
    assert (minilm_dir / "modules.json").is_file()
