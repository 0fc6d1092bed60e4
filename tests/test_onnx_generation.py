"""The tiny Llama through the ONNX path: export with KV cache, int8/int4, generate like PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
from edgepack.runtimes.engine import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    CancelToken,
    FinishEvent,
    PromptTooLongError,
    SamplingParams,
    TokenEvent,
)
from edgepack.runtimes.onnx_engine import OnnxEngine, OnnxSettings
from support.onnx_exports import quantized

from edgepack.build.onnx_validate import NEW_TOKENS, PROMPTS, validate_onnx

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)


def _engine(model_path, export, kind="completion", **kw):
    engine = OnnxEngine(OnnxSettings(model_path, export.tokenizer_dir, "tiny", kind,
                                      n_threads=2, **kw))
    engine.load()
    return engine


def _run(engine, prompt, params, cancel=None):
    events = list(engine.generate(prompt, params, cancel or CancelToken()))
    assert isinstance(events[-1], FinishEvent)
    assert all(isinstance(e, TokenEvent) for e in events[:-1])
    return "".join(e.text for e in events[:-1]), events[-1]


@pytest.fixture(scope="module")
def torch_model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(),
            AutoTokenizer.from_pretrained(tiny_llama_dir))


def _torch_greedy(torch_model, text):
    model, tok = torch_model
    ids = tok(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=2)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_int8_generation_is_identical_to_pytorch_greedy(tiny_llama_onnx, torch_model, tmp_path):
    q = quantized(tiny_llama_onnx, "int8", tmp_path)
    engine = _engine(q.model_path, tiny_llama_onnx)
    for text in PROMPTS:
        want = _torch_greedy(torch_model, text)
        got, finish = _run(engine, engine.prepare_completion(text), GREEDY)
        assert got == want, text
        assert finish.reason in (FINISH_LENGTH, FINISH_STOP)


def test_int8_and_int4_validate_and_int4_is_smaller(tiny_llama_dir, tiny_llama_onnx, tmp_path):
    import onnx

    q8 = quantized(tiny_llama_onnx, "int8", tmp_path)
    q4 = quantized(tiny_llama_onnx, "int4", tmp_path)
    assert q4.size_bytes < q8.size_bytes < tiny_llama_onnx.model_path.stat().st_size
    ops = {n.op_type for n in onnx.load(str(q4.model_path)).graph.node}
    assert "MatMulNBits" in ops
    r8 = validate_onnx(tiny_llama_dir, q8.model_path, tiny_llama_onnx.tokenizer_dir,
                       kind="generation", scheme="int8", n_threads=2)
    r4 = validate_onnx(tiny_llama_dir, q4.model_path, tiny_llama_onnx.tokenizer_dir,
                       kind="generation", scheme="int4", n_threads=2)
    assert r8.metric == "greedy_token_agreement" and r8.value == 1.0
    assert r8.details["identical_generations"] == f"{len(PROMPTS)}/{len(PROMPTS)}"
    assert r4.passed


def test_prefill_in_chunks_gives_pytorch_logits(tiny_llama_onnx, torch_model):
    import torch
    from edgepack.runtimes.onnx_generate import PREFILL_CHUNK

    engine = _engine(tiny_llama_onnx.model_path, tiny_llama_onnx)
    prompt = engine.prepare_completion("one two three " * 100)
    assert len(prompt.tokens) > 2 * PREFILL_CHUNK
    engine._decoder.reset()
    got = engine._decoder.feed(prompt.tokens)
    with torch.no_grad():
        want = torch_model[0](torch.tensor([list(prompt.tokens)])).logits[0, -1].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


def test_stop_sequences_max_tokens_seed_and_cancel(tiny_llama_onnx):
    engine = _engine(tiny_llama_onnx.model_path, tiny_llama_onnx)
    prompt = engine.prepare_completion("Once upon a time")
    full, _ = _run(engine, prompt, SamplingParams(max_tokens=12, temperature=0.0))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut, finish = _run(engine, prompt, SamplingParams(max_tokens=12, temperature=0.0,
                                                      stop=(stop,)))
    assert finish.reason == FINISH_STOP and cut == full[: full.index(stop)]

    _, finish = _run(engine, prompt, SamplingParams(max_tokens=3, temperature=0.0))
    assert (finish.reason, finish.completion_tokens) == (FINISH_LENGTH, 3)
    assert finish.prompt_tokens == len(prompt.tokens)

    sampled = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a, _ = _run(engine, prompt, sampled)
    b, _ = _run(engine, prompt, sampled)
    c, _ = _run(engine, prompt, SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9,
                                               seed=8))
    assert a == b and a != c

    cancel = CancelToken()
    stream = engine.generate(prompt, SamplingParams(max_tokens=50, temperature=0.0), cancel)
    for event in stream:
        if isinstance(event, FinishEvent):
            break
        cancel.cancel()
    assert event.reason == FINISH_CANCELLED and event.completion_tokens <= 2


def test_chat_template_renders_like_transformers(tiny_llama_onnx, torch_model):
    engine = _engine(tiny_llama_onnx.model_path, tiny_llama_onnx, kind="chat")
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the capital of France?"}]
    want = torch_model[1].apply_chat_template(messages, add_generation_prompt=True)
    assert list(engine.prepare_chat(messages).tokens) == list(want)


def test_a_prompt_longer_than_the_context_is_refused(tiny_llama_onnx):
    engine = _engine(tiny_llama_onnx.model_path, tiny_llama_onnx, n_ctx=16)
    assert engine.n_ctx == 16
    with pytest.raises(PromptTooLongError):
        engine.prepare_completion("word " * 40)
