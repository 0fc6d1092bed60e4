"""Model facts: what the planner needs to know about a model, read without its weights.

Pure: :func:`model_facts` takes ``config.json`` as a dict and the safetensors headers as
``{file: {tensor name: (dtype, shape)}}`` (what :func:`edgepack.build.hub.read_model_metadata`
returns) and maps every tensor to the name and ggml shape it gets in a GGUF, so the quant rules
in :mod:`edgepack.plan.quants` can be applied per tensor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from edgepack.errors import BuildError

# model_type in config.json -> family. Decoders follow llama.cpp's LLaMA-style tensor layout.
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                 "gemma3", "phi3")  # fmt: skip
ENCODER_TYPES = ("bert", "xlm-roberta", "roberta", "nomic_bert")
SUPPORTED_TYPES = DECODER_TYPES + ENCODER_TYPES

# HF decoder tensor name (after "model.layers.N.") -> GGUF name (after "blk.N."), per
# convert_hf_to_gguf.py / gguf-py tensor_mapping.py.
_DECODER_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.qkv_proj": "attn_qkv",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
# Gemma 2/3 have four norms per layer; post_attention_layernorm means something else there.
_GEMMA_NORMS = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_ENCODER_LAYER = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}
_ENCODER_TOP = {
    "embeddings.word_embeddings": "token_embd",
    "embeddings.position_embeddings": "position_embd",
    "embeddings.token_type_embeddings": "token_types",
    "embeddings.LayerNorm": "token_embd_norm",
}
_LAYER_RE = re.compile(r"^(?:[A-Za-z_]+\.)*?(?:layers|layer|h)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TensorFact:
    """One weight: HF name and shape (rows first), dtype, and its GGUF name and ggml shape."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    gguf_name: str | None  # None: not part of the GGUF (e.g. BERT pooler)
    gguf_shape: tuple[int, ...]

    @property
    def n_params(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ModelSizes:
    """The sizes a model's config.json or GGUF metadata states (``vocab_size`` 0: not stated)."""

    n_layer: int
    hidden_size: int
    n_head: int
    n_kv_head: int
    head_dim: int
    ffn_size: int
    vocab_size: int
    max_context: int


@dataclass(frozen=True)
class ModelFacts(ModelSizes):
    """What the planner knows about a model: its stated sizes, and what it is and holds.
    ``family`` is ``decoder`` or ``encoder``."""

    architecture: str
    model_type: str
    family: str
    n_params: int
    tied_embeddings: bool
    tensors: tuple[TensorFact, ...]

    @classmethod
    def from_sizes(cls, sizes: ModelSizes, tensors: tuple[TensorFact, ...], *,
                   architecture: str, model_type: str, family: str,
                   tied_embeddings: bool) -> ModelFacts:
        """The facts a reader (config.json + safetensors, or a GGUF header) found:
        ``n_params`` is the sum over ``tensors``, and a ``vocab_size`` of 0 (not stated) is
        the row count of the token embedding (0 without one)."""
        stated = {f.name: getattr(sizes, f.name) for f in fields(ModelSizes)}
        if not stated["vocab_size"]:
            embd = next((t for t in tensors if t.gguf_name == "token_embd.weight"), None)
            stated["vocab_size"] = embd.shape[0] if embd else 0
        return cls(**stated, architecture=architecture, model_type=model_type, family=family,
                   n_params=sum(t.n_params for t in tensors),
                   tied_embeddings=tied_embeddings, tensors=tensors)

    @property
    def n_gqa(self) -> int:
        return max(1, self.n_head // max(1, self.n_kv_head))

    def to_dict(self) -> dict[str, Any]:
        """Summary for --json (the per-tensor list stays out: it is long and derivable)."""
        return {
            "architecture": self.architecture,
            "model_type": self.model_type,
            "family": self.family,
            "n_params": self.n_params,
            "n_layer": self.n_layer,
            "hidden_size": self.hidden_size,
            "n_head": self.n_head,
            "n_kv_head": self.n_kv_head,
            "head_dim": self.head_dim,
            "ffn_size": self.ffn_size,
            "vocab_size": self.vocab_size,
            "max_context": self.max_context,
            "tied_embeddings": self.tied_embeddings,
            "n_tensors": len(self.tensors),
        }


def _cfg(config: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    # Gemma 3 multimodal configs nest the text model under text_config.
    for src in (config, config.get("text_config") or {}):
        for k in keys:
            if src.get(k) is not None:
                return src[k]
    return default


def _gguf_name(name: str, family: str, gemma: bool) -> str | None:
    base, _, suffix = name.rpartition(".")
    if family == "decoder":
        if base in ("model.embed_tokens", "model.language_model.embed_tokens"):
            return f"token_embd.{suffix}"
        if base == "lm_head":
            return f"output.{suffix}"
        if base in ("model.norm", "model.language_model.norm"):
            return f"output_norm.{suffix}"
        table = {**_DECODER_LAYER, **_GEMMA_NORMS} if gemma else _DECODER_LAYER
    else:
        for prefix in ("bert.", "roberta.", ""):
            if base.startswith(prefix) and base[len(prefix) :] in _ENCODER_TOP:
                return f"{_ENCODER_TOP[base[len(prefix) :]]}.{suffix}"
        table = _ENCODER_LAYER
    m = _LAYER_RE.match(base)
    if m and m.group(2) in table:
        return f"blk.{int(m.group(1))}.{table[m.group(2)]}.{suffix}"
    return None


# Heads whose output the server has no route for: refused by plan and build alike, before
# any weight byte, instead of failing after the download and export.
_UNSUPPORTED_HEADS = ("ForSequenceClassification", "ForTokenClassification",
                      "ForQuestionAnswering", "ForMultipleChoice")  # fmt: skip


def _check_task(model_type: str, family: str, archs: list[str]) -> None:
    head = next((h for a in archs for h in _UNSUPPORTED_HEADS if a.endswith(h)), None)
    if head is None:
        return
    task = head[3:]  # "SequenceClassification"
    raise BuildError(
        f"{', '.join(archs)} is a {model_type} model with a {task} head; edgepack serves "
        "chat/completion models (…ForCausalLM) and embedding models (encoders without a head)",
        hint="pick the base or embedding checkpoint of this model, or a ForCausalLM model; "
        f"supported model types: {', '.join(SUPPORTED_TYPES)}",
    )


def model_facts(config: Mapping[str, Any], tensors: Mapping[str, Mapping[str, Any]]) -> ModelFacts:
    """Facts from ``config`` (config.json) and ``tensors`` ({file: {name: (dtype, shape)}}).

    Raises BuildError for an architecture edgepack does not plan for, or for a config that lacks
    the sizes the planner needs.
    """
    model_type = str(_cfg(config, "model_type", default="")).lower()
    archs = config.get("architectures") or [model_type]
    if model_type not in SUPPORTED_TYPES:
        raise BuildError(
            f"model type {model_type!r} ({', '.join(map(str, archs))}) is not supported",
            hint=f"edgepack plans for: {', '.join(SUPPORTED_TYPES)}",
        )
    family = "decoder" if model_type in DECODER_TYPES else "encoder"
    _check_task(model_type, family, [str(a) for a in archs])
    try:
        hidden = int(_cfg(config, "hidden_size", "n_embd", "d_model"))
        n_layer = int(_cfg(config, "num_hidden_layers", "n_layer"))
        n_head = int(_cfg(config, "num_attention_heads", "n_head"))
    except (TypeError, ValueError) as e:
        raise BuildError(
            f"config.json of this {model_type} model lacks hidden_size / num_hidden_layers / "
            f"num_attention_heads ({e})",
            hint="check that the folder or repo holds a complete Hugging Face config.json",
        ) from e
    sizes = ModelSizes(
        n_layer=n_layer,
        hidden_size=hidden,
        n_head=n_head,
        n_kv_head=int(_cfg(config, "num_key_value_heads", default=n_head) or n_head),
        head_dim=int(_cfg(config, "head_dim", default=0) or hidden // n_head),
        ffn_size=int(_cfg(config, "intermediate_size", "n_inner", default=4 * hidden)
                     or 4 * hidden),
        vocab_size=int(_cfg(config, "vocab_size", default=0) or 0),
        max_context=int(_cfg(config, "max_position_embeddings", "n_positions", default=2048)
                        or 2048),
    )
    gemma = model_type.startswith("gemma")

    seen: dict[str, TensorFact] = {}
    for file_tensors in tensors.values():
        for name, (dtype, shape) in file_tensors.items():
            shape_t = tuple(int(d) for d in shape)
            gname = _gguf_name(name, family, gemma)
            seen[name] = TensorFact(name, shape_t, str(dtype), gname, tuple(reversed(shape_t)))
    if not seen:
        raise BuildError(
            f"no safetensors tensors found for this {model_type} model",
            hint="edgepack reads sizes from safetensors headers; convert .bin weights first",
        )
    names = {t.gguf_name for t in seen.values()}
    tie_cfg = _cfg(config, "tie_word_embeddings", default=family == "decoder")
    tied = family == "decoder" and ("output.weight" not in names or bool(tie_cfg))
    facts_tensors = tuple(
        t
        for t in sorted(seen.values(), key=lambda t: t.name)
        if not (tied and t.gguf_name == "output.weight")  # a tied lm_head is not stored twice
    )
    return ModelFacts.from_sizes(sizes, facts_tensors, architecture=str(archs[0]),
                                 model_type=model_type, family=family, tied_embeddings=tied)
