"""The ONNX engine's parts that need no exported graph, and its import boundary."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from edgepack.runtimes.engine import EngineError
from edgepack.runtimes.onnx_engine import pool, resolve_providers
from edgepack.runtimes.onnx_generate import Detokenizer, Sampler

from edgepack.build.onnx_export import normalize_task
from edgepack.build.onnx_quantize import quantize_onnx
from edgepack.errors import EXIT_RUNTIME, EXIT_USAGE, UsageError

FORBIDDEN = ("torch", "transformers", "optimum", "huggingface_hub")


def test_a_missing_execution_provider_is_a_runtime_error_naming_it():
    assert resolve_providers(["cpu"], ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(EngineError) as info:
        resolve_providers(["cuda", "cpu"], ["AzureExecutionProvider", "CPUExecutionProvider"])
    assert info.value.exit_code == EXIT_RUNTIME
    assert "CUDAExecutionProvider" in info.value.message
    assert "CPUExecutionProvider" in info.value.message  # what is available


def test_unknown_task_and_scheme_are_usage_errors(tmp_path):
    assert normalize_task("embeddings") == "feature-extraction"
    with pytest.raises(UsageError) as info:
        normalize_task("translation")
    assert info.value.exit_code == EXIT_USAGE
    with pytest.raises(UsageError, match="int3"):
        quantize_onnx(tmp_path / "model.onnx", tmp_path / "out.onnx", "int3")


def test_sampler_greedy_top_p_and_seed():
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert Sampler(temperature=0.0).sample(logits) == 1
    # top_p so small that only the most likely token is left: sampling becomes greedy.
    assert {Sampler(temperature=1.0, top_p=0.01, seed=s).sample(logits) for s in range(20)} == {1}
    draws = [Sampler(temperature=5.0, seed=3).sample(logits) for _ in range(3)]
    assert len(set(draws)) == 1
    spread = {Sampler(temperature=5.0, seed=s).sample(logits) for s in range(40)}
    assert len(spread) > 2
    # A repeat penalty turns the leader down once it was generated.
    s = Sampler(temperature=0.0, repeat_penalty=2.0)
    s.accept(1)
    assert s.sample(logits) == 2


def test_pooling_modes_ignore_padding():
    hidden = np.array([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
    mask = np.array([[1, 1, 0]])
    np.testing.assert_allclose(pool(hidden, mask, "mean"), [[2.0, 1.0]])
    np.testing.assert_allclose(pool(hidden, mask, "cls"), [[1.0, 0.0]])
    np.testing.assert_allclose(pool(hidden, mask, "max"), [[3.0, 2.0]])
    np.testing.assert_allclose(pool(hidden, mask, "mean_sqrt_len"), [[4 / 2**0.5, 2 / 2**0.5]])


@pytest.mark.slow
def test_detokenizer_never_splits_a_character(tiny_llama_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json"))
    text = "Tōkyō 東京 🙂 naïve café"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    detok = Detokenizer(tok)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.slow
def test_the_onnx_engine_loads_and_embeds_without_the_build_side(minilm_onnx):
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from edgepack.runtimes.onnx_engine import OnnxEngine, OnnxSettings\n"
        f"e = OnnxEngine(OnnxSettings(Path({str(minilm_onnx.model_path)!r}), "
        f"Path({str(minilm_onnx.tokenizer_dir)!r}), 'm', 'embedding', n_threads=1))\n"
        "e.load(); e.warm_up(); v, n = e.embed(['hello'])\n"
        f"print(json.dumps([len(v[0]), sorted(k for k in sys.modules "
        f"if k.split('.')[0] in {FORBIDDEN!r})]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    dim, leaked = json.loads(out.stdout.strip().splitlines()[-1])
    assert dim == 384
    assert leaked == [], f"the ONNX engine pulled in build-side packages: {leaked}"
