"""Config dicts of real models and safetensors-like tensor maps synthesized from them.

The configs are copied from the models' config.json on the Hugging Face hub (Qwen2.5-0.5B/1.5B/
3B-Instruct, Llama-3.1-8B-Instruct, SmolLM2-135M-Instruct, Llama-2-7b-hf); the tensor shapes
follow from the config exactly as the transformers modeling code creates them, so planner
tests need no download.
"""

from __future__ import annotations

from typing import Any


def _llama_like(
    model_type: str,
    hidden: int,
    layers: int,
    heads: int,
    kv: int,
    ffn: int,
    vocab: int,
    ctx: int,
    tied: bool,
    bias: bool = False,
    **extra: Any,
) -> dict:
    return {
        "architectures": [extra.pop("arch")],
        "model_type": model_type,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "intermediate_size": ffn,
        "vocab_size": vocab,
        "max_position_embeddings": ctx,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "_qkv_bias": bias,
        **extra,
    }


CONFIGS: dict[str, dict[str, Any]] = {
    "SmolLM2-135M": _llama_like(
        "llama", 576, 30, 9, 3, 1536, 49152, 8192, True, arch="LlamaForCausalLM"
    ),
    "Qwen2.5-0.5B": _llama_like(
        "qwen2", 896, 24, 14, 2, 4864, 151936, 32768, True, True, arch="Qwen2ForCausalLM"
    ),
    "Qwen2.5-1.5B": _llama_like(
        "qwen2", 1536, 28, 12, 2, 8960, 151936, 32768, True, True, arch="Qwen2ForCausalLM"
    ),
    "Qwen2.5-3B": _llama_like(
        "qwen2", 2048, 36, 16, 2, 11008, 151936, 32768, True, True, arch="Qwen2ForCausalLM"
    ),
    "Llama-3.1-8B": _llama_like(
        "llama", 4096, 32, 32, 8, 14336, 128256, 131072, False, arch="LlamaForCausalLM"
    ),
    # A 7B without grouped-query attention: 2 GiB of f16 KV cache at ctx 4096.
    "Llama-2-7B": _llama_like(
        "llama", 4096, 32, 32, 32, 11008, 32000, 4096, False, arch="LlamaForCausalLM"
    ),
}


def synth_tensors(config: dict[str, Any], dtype: str = "BF16") -> dict[str, dict[str, Any]]:
    """{"model.safetensors": {name: (dtype, shape)}} as transformers would save the model."""
    h, n, ff, v = (
        config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    )
    hd = h // config["num_attention_heads"]
    kvd = config["num_key_value_heads"] * hd
    t: dict[str, Any] = {
        "model.embed_tokens.weight": (dtype, [v, h]),
        "model.norm.weight": (dtype, [h]),
    }
    if not config["tie_word_embeddings"]:
        t["lm_head.weight"] = (dtype, [v, h])
    for i in range(n):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = (dtype, [h, h])
        t[p + "self_attn.k_proj.weight"] = (dtype, [kvd, h])
        t[p + "self_attn.v_proj.weight"] = (dtype, [kvd, h])
        t[p + "self_attn.o_proj.weight"] = (dtype, [h, h])
        if config.get("_qkv_bias"):
            t[p + "self_attn.q_proj.bias"] = (dtype, [h])
            t[p + "self_attn.k_proj.bias"] = (dtype, [kvd])
            t[p + "self_attn.v_proj.bias"] = (dtype, [kvd])
        t[p + "mlp.gate_proj.weight"] = (dtype, [ff, h])
        t[p + "mlp.up_proj.weight"] = (dtype, [ff, h])
        t[p + "mlp.down_proj.weight"] = (dtype, [h, ff])
        t[p + "input_layernorm.weight"] = (dtype, [h])
        t[p + "post_attention_layernorm.weight"] = (dtype, [h])
    return {"model.safetensors": t}
