"""Model facts from config dicts and safetensors headers (pure), and from a real folder."""

from __future__ import annotations

import pytest
from support.configs import CONFIGS, synth_tensors

from edgepack.errors import BuildError
from edgepack.plan.facts import model_facts


def test_llama_facts_from_config_and_headers():
    cfg = CONFIGS["Llama-3.1-8B"]
    f = model_facts(cfg, synth_tensors(cfg))
    assert (f.family, f.n_layer, f.n_head, f.n_kv_head, f.head_dim) == ("decoder", 32, 32, 8, 128)
    assert f.n_params == 8_030_261_248  # Llama-3.1-8B's published parameter count
    assert not f.tied_embeddings
    names = {t.gguf_name for t in f.tensors}
    assert {
        "token_embd.weight",
        "output.weight",
        "blk.31.ffn_down.weight",
        "blk.0.attn_v.weight",
        "output_norm.weight",
    } <= names
    down = next(t for t in f.tensors if t.gguf_name == "blk.0.ffn_down.weight")
    assert down.shape == (4096, 14336) and down.gguf_shape == (14336, 4096)


def test_tied_qwen_has_no_output_tensor_and_counts_embeddings_once():
    cfg = CONFIGS["Qwen2.5-0.5B"]
    f = model_facts(cfg, synth_tensors(cfg))
    assert f.tied_embeddings
    assert "output.weight" not in {t.gguf_name for t in f.tensors}
    assert f.n_params == 494_032_768  # Qwen2.5-0.5B: 0.49B parameters
    assert "blk.3.attn_q.bias" in {t.gguf_name for t in f.tensors}


def test_minilm_folder_is_an_encoder(minilm_dir):
    from edgepack.build.hub import read_model_metadata

    meta = read_model_metadata(str(minilm_dir))
    f = model_facts(meta.config, meta.safetensors)
    assert (f.family, f.n_layer, f.hidden_size, f.max_context) == ("encoder", 6, 384, 512)
    assert 22_000_000 < f.n_params < 23_000_000
    assert "blk.5.layer_output_norm.weight" in {t.gguf_name for t in f.tensors}


def test_unsupported_architecture_is_a_build_error_listing_supported_ones():
    with pytest.raises(BuildError) as e:
        model_facts({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}, {})
    assert e.value.exit_code == 5
    assert "mamba" in e.value.message and "qwen2" in (e.value.hint or "")


def test_prefixed_encoder_names_map_to_gguf_names():
    cfg = {
        "architectures": ["BertForMaskedLM"],
        "model_type": "bert",
        "hidden_size": 384,
        "num_hidden_layers": 1,
        "num_attention_heads": 12,
    }
    tensors = {
        "model.safetensors": {
            "bert.embeddings.word_embeddings.weight": ("F32", [30522, 384]),
            "bert.encoder.layer.0.attention.self.query.weight": ("F32", [384, 384]),
            "bert.encoder.layer.0.output.dense.weight": ("F32", [384, 1536]),
            "classifier.weight": ("F32", [2, 384]),
        }
    }
    f = model_facts(cfg, tensors)
    names = {t.name: t.gguf_name for t in f.tensors}
    assert names["bert.encoder.layer.0.attention.self.query.weight"] == "blk.0.attn_q.weight"
    assert names["bert.encoder.layer.0.output.dense.weight"] == "blk.0.ffn_down.weight"
    assert names["bert.embeddings.word_embeddings.weight"] == "token_embd.weight"
    assert names["classifier.weight"] is None and f.vocab_size == 30522
