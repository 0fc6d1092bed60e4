"""all-MiniLM-L6-v2 through the ONNX path: export, int8 per-channel / fp16, validate, embed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from edgepack.runtimes.onnx_engine import OnnxEngine, OnnxSettings
from support.onnx_exports import quantized

from edgepack.build.onnx_export import export_onnx
from edgepack.build.onnx_validate import SENTENCES, validate_onnx
from edgepack.errors import EXIT_BUILD, BuildError

pytestmark = pytest.mark.slow


def _engine(model_path, export):
    engine = OnnxEngine(OnnxSettings(model_path, export.tokenizer_dir, "minilm", "embedding",
                                      n_threads=2))
    engine.load()
    return engine


def _reference(minilm_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu").encode(list(SENTENCES))


def _cosines(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_export_ships_the_sentence_transformers_pipeline_and_dynamic_padding(minilm_onnx):
    cfg = json.loads((minilm_onnx.tokenizer_dir / "edgepack_tokenizer.json").read_text())
    assert (cfg["kind"], cfg["pooling"], cfg["normalize"]) == ("embedding", "mean", True)
    # sentence_bert_config.json's max_seq_length, not tokenizer.json's 128.
    assert cfg["max_length"] == 256
    tok = json.loads((minilm_onnx.tokenizer_dir / "tokenizer.json").read_text())
    assert tok["padding"] is None and tok["truncation"] is None
    assert "model.onnx" in minilm_onnx.files


def test_engine_pads_per_batch_and_truncates_at_max_length(minilm_onnx):
    engine = _engine(minilm_onnx.model_path, minilm_onnx)
    _, n_short = engine.embed(["hello world"])
    assert n_short == 4  # [CLS] hello world [SEP], not 128 padded positions
    vectors, n_long = engine.embed(["word " * 1000, "hi"])
    assert n_long == 256 + 3
    assert len(vectors) == 2 and len(vectors[0]) == 384


def test_int8_for_a_pi_keeps_every_held_out_sentence_above_0_99(
    minilm_onnx, minilm_dir, tmp_path
):
    import onnx
    from sentence_transformers import SentenceTransformer
    from support.heldout_sentences import HELDOUT

    q = quantized(minilm_onnx, "int8", tmp_path)
    assert q.size_bytes < 0.3 * minilm_onnx.model_path.stat().st_size
    ops = {n.op_type for n in onnx.load(str(q.model_path)).graph.node}
    assert "MatMulNBits" in ops and "MatMul" in ops  # weights quantized, Q·K stays fp32

    result = validate_onnx(minilm_dir, q.model_path, minilm_onnx.tokenizer_dir,
                           kind="embedding", scheme="int8", n_threads=2)
    assert result.metric == "embedding_cosine_min" and result.value >= 0.99
    # Held out: none of these is in the validation set; short, long, non-English, code, numbers.
    assert len(HELDOUT) >= 64 and not set(HELDOUT) & set(SENTENCES)
    got, _ = _engine(q.model_path, minilm_onnx).embed(list(HELDOUT))
    want = SentenceTransformer(str(minilm_dir), device="cpu").encode(list(HELDOUT))
    cos = _cosines(got, want)
    assert cos.min() >= 0.99, sorted(zip(cos, HELDOUT, strict=True))[:3]


def test_fp16_for_a_jetson_keeps_fp32_io_and_validates_on_the_cpu_provider(
    minilm_onnx, minilm_dir, tmp_path
):
    # Jetson's CUDA execution provider is not available here: this runs the fp16 graph on
    # onnxruntime's CPU provider, which checks the graph and its numbers, not CUDA speed.
    import onnx

    q = quantized(minilm_onnx, "fp16", tmp_path)
    assert any("untested on a GPU" in n for n in q.notes)
    graph = onnx.load(str(q.model_path))
    assert graph.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.graph.initializer)
    result = validate_onnx(minilm_dir, q.model_path, minilm_onnx.tokenizer_dir,
                           kind="embedding", scheme="fp16", n_threads=2)
    assert result.value >= 0.999


def test_a_failing_validation_is_a_build_error(minilm_onnx, minilm_dir):
    with pytest.raises(BuildError) as info:
        validate_onnx(minilm_dir, minilm_onnx.model_path, minilm_onnx.tokenizer_dir,
                      kind="embedding", scheme="fp32", threshold=1.01, n_threads=2)
    assert info.value.exit_code == EXIT_BUILD
    assert "embedding_cosine_min" in info.value.message


def test_a_module_the_engine_cannot_run_fails_before_exporting(minilm_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(minilm_dir, model)
    modules = json.loads((model / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense",
                    "type": "sentence_transformers.models.Dense"})
    (model / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(BuildError, match="Dense"):
        export_onnx(model, tmp_path / "out", "feature-extraction")
    assert not (tmp_path / "out").exists()


def test_an_exporter_failure_is_a_build_error_with_its_message(minilm_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(minilm_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(BuildError, match="no-such-architecture") as info:
        export_onnx(model, tmp_path / "out", "feature-extraction")
    assert info.value.exit_code == EXIT_BUILD
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))  # the temporary export was cleaned up
