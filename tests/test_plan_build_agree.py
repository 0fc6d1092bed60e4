"""Plan and build agree: a model edgepack cannot serve is refused by `plan` and by `build`
before any weight byte, with the reason and what is supported (real checkpoint, real hub
client on loopback)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepack.cli.main import cli

pytestmark = pytest.mark.slow
REPO = "edgepack-test/tiny-bert-classifier"


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, minilm_dir) -> Path:
    """A tiny BertForSequenceClassification saved by transformers, MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("classifier")
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=2, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize("fmt", ["auto", "gguf", "onnx"])
def test_classifier_is_refused_by_plan_and_build_before_any_weight(
    fmt, local_hub, classifier_dir, tmp_path
):
    local_hub.add_repo(REPO, classifier_dir)
    code, plan_text = run("plan", REPO, "--device", "raspberry-pi-5-8gb", "--format", fmt)
    assert code == 5, plan_text
    local_hub.clear_log()
    code, build_text = run("build", REPO, "--device", "raspberry-pi-5-8gb", "--format", fmt,
                           "--out", str(tmp_path / "out"))
    assert code == 5, build_text
    for text in (plan_text, build_text):
        assert "BertForSequenceClassification" in text and "SequenceClassification head" in text
        assert "ForCausalLM" in text and "supported model types" in text
        assert "truncated" not in text
    # Only metadata: config.json and the safetensors header, never the weights.
    weights = local_hub.file_requests("model.safetensors")
    assert all(r.range is not None for r in weights), weights
    assert not (tmp_path / "out").exists()
