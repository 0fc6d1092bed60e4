"""Tiny chat models whose templates can call tools, built to GGUF through edgepack's converter.

Each is the tiny random-weight Llama (``models.build_tiny_llama``: SmolLM2's tokenizer, whose
``<|im_start|>``/``<|im_end|>`` are ChatML's) with a real chat template from llama.cpp's
``models/templates/`` folder, as vendored in the llama-cpp-python sdist the converter is
fetched from (https://github.com/ggml-org/llama.cpp/tree/master/models/templates):

- ``qwen25``: ``Qwen-Qwen2.5-7B-Instruct.jinja`` (``<tool_call>`` JSON blocks),
- ``llama31``: ``meta-llama-Llama-3.1-8B-Instruct.jinja`` (a bare JSON call, ``ipython`` role),
- ``mistral``: ``mistralai-Mistral-Nemo-Instruct-2407.jinja`` (``[TOOL_CALLS]`` and a JSON list
  of calls whose ids are 9 alphanumerics, ``[TOOL_RESULTS]`` for the results).

Random weights say nothing useful, but a grammar-forced call is valid whatever the weights,
which is what the server's tool-call path needs to be tested end to end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from support.models import _cached_build, build_gguf, build_tiny_llama, converter_environ

TEMPLATES = {
    "qwen25": "Qwen-Qwen2.5-7B-Instruct.jinja",
    "llama31": "meta-llama-Llama-3.1-8B-Instruct.jinja",
    "mistral": "mistralai-Mistral-Nemo-Instruct-2407.jinja",
}
TOOL_MODEL_VERSION = "1"


def template_source(file_name: str) -> str:
    """A chat template from the llama.cpp source the converter was fetched with."""
    from edgepack.build.gguf_convert import ensure_converter

    root = ensure_converter(converter_environ()).root
    return (root / "models" / "templates" / file_name).read_text(encoding="utf-8")


def build_tool_model(family: str) -> Path:
    """HF folder of the tiny Llama carrying ``family``'s chat template (cached)."""
    template = template_source(TEMPLATES[family])

    def build(out: Path) -> None:
        src = build_tiny_llama()
        for f in src.iterdir():
            shutil.copy2(f, out / f.name)
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
        cfg_path = out / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["chat_template"] = template
        cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")

    return _cached_build(f"tiny-{family}-tools", TOOL_MODEL_VERSION, build, None)


def tool_model_gguf(family: str) -> Path:
    """The ``family`` tool model as an f32 GGUF (edgepack's converter; cached)."""
    return build_gguf(build_tool_model(family), "f32")
