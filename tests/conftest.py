"""Shared fixtures. Fixture modules live in tests/support/ and are imported here."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_user_dirs(tmp_path_factory, monkeypatch):
    """Point every user-level directory at a temporary one, so tests never touch ~/.

    The build cache (converter, intermediates, quantized files) is shared by all tests and kept
    between runs beside the test models: its entries are keyed by what they were made from.
    Tests about caching itself set a fresh EDGEPACK_CACHE of their own.
    """
    from support.models import cache_root

    home = tmp_path_factory.mktemp("edgepack-home")
    monkeypatch.setenv("EDGEPACK_HOME", str(home))
    monkeypatch.setenv("EDGEPACK_CACHE", str(cache_root() / "edgepack-cache"))
    monkeypatch.delenv("EDGEPACK_DEBUG", raising=False)
    monkeypatch.delenv("EDGEPACK_API_KEY", raising=False)
    yield

from support.bundles import chat_bundle, chat_server, embedding_bundle, minilm_gguf  # noqa: E402,F401
from support.hub import local_hub  # noqa: E402,F401
from support.models import (  # noqa: E402, F401
    minilm_dir,
    minilm_f32_gguf,
    smollm2_dir,
    smollm2_f16_gguf,
    tiny_llama_dir,
    tiny_llama_f32_gguf,
)
from support.nginx import nginx  # noqa: E402,F401
from support.onnx_exports import minilm_onnx, tiny_llama_onnx  # noqa: E402,F401
from support.ota import static_http  # noqa: E402,F401
