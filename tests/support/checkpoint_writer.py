"""Write one tiny random-weight checkpoint of a model family with whichever transformers runs it.

A standalone script (no edgepack imports): tests/support/families.py runs it once with the build
venv's transformers 4 and once with a cached transformers-5 venv, so each fixture holds the files
that generation really writes (tokenizer class, ``dtype`` vs ``torch_dtype``, a separate
``chat_template.jinja``, ...), not a hand-made imitation of them.

    python checkpoint_writer.py OUT_ROOT FAMILY... --bpe DIR --spm DIR --wordpiece DIR

writes ``OUT_ROOT/<family>/``. The tokenizers come from folders made by families.py: SmolLM2's
byte-level BPE (the Llama-3/Qwen kind), a small SentencePiece model (Mistral v0.3, Gemma, Phi-3
use SentencePiece) and MiniLM's WordPiece (BERT). Each is loaded under the tokenizer class the
family's hub repositories name, so the generation's save path for that class runs. Model
weights are random (fixed seed); rope_theta is not the library default, so a reader that drops
it (transformers 4 reading transformers 5's ``rope_parameters``) changes the model visibly.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

# ChatML: simple, and every family's tokenizer gets its markers as special tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)
_ROPE = {"rope_theta": 50000.0}
# family -> (model_type, AutoModel class, tokenizer kind, tokenizer class on the hub, config)
# Tokenizer classes as the families' hub repositories name them: Llama-3 and Mistral-Nemo
# "PreTrainedTokenizerFast", Mistral-7B v0.3 and Phi-3-mini "LlamaTokenizer", Gemma
# "GemmaTokenizer", BERT "BertTokenizer". Qwen's repositories name "Qwen2Tokenizer", but
# transformers 5's Qwen2Tokenizer replaces tokenizer.json's pre-tokenizer with Qwen's own regex;
# over SmolLM2's vocabulary that pair is unknown to llama.cpp's pre-tokenizer table (it knows
# real vocabularies by the hash of their output), so the Qwen fixtures name the generic class.
FAMILIES: dict[str, tuple[str, str, str, str, dict]] = {
    "llama": ("llama", "AutoModelForCausalLM", "bpe", "PreTrainedTokenizerFast",
              {"tie_word_embeddings": True, **_ROPE}),
    "mistral": ("mistral", "AutoModelForCausalLM", "spm", "LlamaTokenizer",
                {"sliding_window": None, **_ROPE}),
    "qwen2": ("qwen2", "AutoModelForCausalLM", "bpe", "PreTrainedTokenizerFast",
              {"tie_word_embeddings": True, **_ROPE}),
    "qwen3": ("qwen3", "AutoModelForCausalLM", "bpe", "PreTrainedTokenizerFast",
              {"head_dim": 16, "tie_word_embeddings": True, **_ROPE}),
    "gemma": ("gemma", "AutoModelForCausalLM", "spm", "GemmaTokenizer",
              {"head_dim": 16, **_ROPE}),
    "gemma2": ("gemma2", "AutoModelForCausalLM", "spm", "GemmaTokenizer",
               {"head_dim": 16, "sliding_window": 64, **_ROPE}),
    "gemma3": ("gemma3_text", "AutoModelForCausalLM", "spm", "GemmaTokenizer",
               {"head_dim": 16, "sliding_window": 64}),
    "phi3": ("phi3", "AutoModelForCausalLM", "spm", "LlamaTokenizer",
             {"pad_token_id": 0, **_ROPE}),
    "bert": ("bert", "AutoModel", "wordpiece", "BertTokenizer", {}),
}


def _tokenizer(kind: str, cls: str, args: argparse.Namespace, work: Path):
    from transformers import AutoTokenizer

    src = Path({"bpe": args.bpe, "spm": args.spm, "wordpiece": args.wordpiece}[kind])
    if kind == "wordpiece":
        return AutoTokenizer.from_pretrained(src)
    # A source folder naming the family's class: the file that carries the vocabulary
    # (tokenizer.json for BPE, tokenizer.model for SentencePiece) and a config.
    work.mkdir(parents=True, exist_ok=True)
    vocab_file = "tokenizer.json" if kind == "bpe" else "tokenizer.model"
    shutil.copyfile(src / vocab_file, work / vocab_file)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    keep = ("bos_token", "eos_token", "unk_token", "pad_token", "add_prefix_space", "legacy")
    cfg = {k: v for k, v in cfg.items() if k in keep}
    cfg["tokenizer_class"] = cls
    (work / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = AutoTokenizer.from_pretrained(work)
    specials = ["<|im_start|>", "<|im_end|>"]
    if kind == "spm" and cls == "LlamaTokenizer":
        # Phi-3's vocabulary has these, and llama.cpp looks them up by text for phi3 models.
        specials += ["<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write(family: str, out: Path, args: argparse.Namespace) -> None:
    import torch
    import transformers

    model_type, auto_name, tok_kind, tok_class, extra = FAMILIES[family]
    tok = _tokenizer(tok_kind, tok_class, args, out.with_name(f".{family}-tokenizer-source"))
    cfg_kwargs = dict(_TINY, vocab_size=len(tok), **extra)
    if family == "bert":
        cfg_kwargs = dict(
            vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=512,
        )
    else:
        cfg_kwargs.update(
            bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else 0,
            eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        )
    config = transformers.AutoConfig.for_model(model_type, **cfg_kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, auto_name).from_config(config).to(torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if family == "bert":  # a sentence-transformers folder, like MiniLM's
        for name in ("modules.json", "1_Pooling"):
            src = Path(args.wordpiece) / name
            if src.is_dir():
                shutil.copytree(src, out / name)
            elif src.is_file():
                shutil.copyfile(src, out / name)
    (out / "edgepack-fixture.json").write_text(
        json.dumps({"family": family, "transformers": transformers.__version__}) + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_root", type=Path)
    parser.add_argument("families", nargs="+", choices=sorted(FAMILIES))
    parser.add_argument("--bpe", required=True)
    parser.add_argument("--spm", required=True)
    parser.add_argument("--wordpiece", required=True)
    args = parser.parse_args()
    for family in args.families:
        out = args.out_root / family
        out.mkdir(parents=True, exist_ok=True)
        write(family, out, args)


if __name__ == "__main__":
    main()
