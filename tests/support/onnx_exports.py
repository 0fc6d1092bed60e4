"""ONNX exports of the test models, made once per test session (optimum export takes seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def minilm_onnx(minilm_dir, tmp_path_factory):
    """all-MiniLM-L6-v2 exported for feature-extraction (fp32), an ``ExportResult``."""
    from edgepack.build.onnx_export import export_onnx

    return export_onnx(minilm_dir, tmp_path_factory.mktemp("minilm-onnx") / "export",
                       "feature-extraction")


@pytest.fixture(scope="session")
def tiny_llama_onnx(tiny_llama_dir, tmp_path_factory):
    """The tiny random Llama exported for text-generation-with-past (fp32)."""
    from edgepack.build.onnx_export import export_onnx

    return export_onnx(tiny_llama_dir, tmp_path_factory.mktemp("tiny-onnx") / "export",
                       "text-generation")


def quantized(export, scheme: str, root: Path):
    """Quantize an export's graph into ``root/<scheme>/model.onnx``; a ``QuantizeResult``."""
    from edgepack.build.onnx_quantize import quantize_onnx

    return quantize_onnx(export.model_path, root / scheme / "model.onnx", scheme)
