"""The llama.cpp engine and its helpers, without HTTP (real SmolLM2 inference)."""

from __future__ import annotations

import pytest
from edgepack.runtimes.engine import (
    CancelToken,
    Engine,
    FinishEvent,
    PromptTooLongError,
    SamplingParams,
    TokenEvent,
)
from edgepack.runtimes.llama_engine import LlamaEngine, LlamaSettings
from edgepack.runtimes.stops import StopScanner
from support.smollm import shipped_smollm_gguf


def test_stop_scanner_holds_back_partial_matches():
    s = StopScanner(["END"])
    assert s.feed("abc E") == "abc "
    assert s.feed("N") == ""
    assert s.feed("D tail") == ""
    assert s.stopped


def test_stop_scanner_releases_false_alarms():
    s = StopScanner(["END"])
    assert s.feed("EN") == ""
    assert s.feed("x") == "ENx"
    assert s.flush() == ""
    assert not s.stopped


@pytest.fixture(scope="module")
def engine():
    e = LlamaEngine(LlamaSettings(shipped_smollm_gguf(), "smollm2", "chat", n_ctx=256,
                                  n_threads=1))
    e.load()
    e.warm_up()
    yield e
    e.close()


def _run(engine, prompt, params, cancel=None):
    text, finish = "", None
    for ev in engine.generate(prompt, params, cancel or CancelToken()):
        if isinstance(ev, TokenEvent):
            text += ev.text
        else:
            finish = ev
    assert isinstance(finish, FinishEvent)
    return text, finish


def test_engine_satisfies_the_protocol(engine):
    assert isinstance(engine, Engine)
    assert engine.n_ctx == 256


def test_chat_template_comes_from_the_gguf(engine):
    prompt = engine.prepare_chat([{"role": "user", "content": "Hi"}])
    assert "<|im_end|>" in prompt.stop
    text, finish = _run(engine, prompt, SamplingParams(max_tokens=8, temperature=0))
    assert "<|im_start|>" not in text
    assert finish.prompt_tokens == len(prompt.tokens)


def test_greedy_is_deterministic_and_counts_tokens(engine):
    prompt = engine.prepare_completion("The capital of France is")
    a = _run(engine, prompt, SamplingParams(max_tokens=6, temperature=0))
    b = _run(engine, prompt, SamplingParams(max_tokens=6, temperature=0))
    assert a[0] == b[0]
    assert a[1].completion_tokens == 6
    assert a[1].reason == "length"


def test_cancel_stops_between_tokens(engine):
    prompt = engine.prepare_completion("Count: 1, 2, 3,")
    cancel = CancelToken()
    gen = engine.generate(prompt, SamplingParams(max_tokens=100, temperature=0), cancel)
    next(gen)
    cancel.cancel("client_disconnected")
    rest = list(gen)
    assert isinstance(rest[-1], FinishEvent)
    assert rest[-1].reason == "cancelled"
    assert rest[-1].completion_tokens <= 2


def test_prompt_longer_than_context_names_both_lengths(engine):
    with pytest.raises(PromptTooLongError) as e:
        engine.prepare_completion("word " * 400)
    assert e.value.n_ctx == 256 and e.value.prompt_tokens > 256
    assert "256" in str(e.value)


def test_context_end_finishes_with_length(engine):
    prompt = engine.prepare_completion("word " * 240)
    _, finish = _run(engine, prompt, SamplingParams(max_tokens=None, temperature=0))
    assert finish.prompt_tokens + finish.completion_tokens <= 256
    assert finish.reason in ("length", "stop")


def test_completion_model_refuses_embeddings(engine):
    with pytest.raises(ValueError):
        engine.embed(["x"])


def test_seeded_sampling_repeats_and_seeds_differ(engine):
    prompt = engine.prepare_completion("Once upon a time")
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    a, _ = _run(engine, prompt, params)
    b, _ = _run(engine, prompt, params)
    others = {_run(engine, prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=s))[0]
              for s in (1, 2, 3)}
    assert a == b
    assert others - {a}


def test_prefix_reuse_matches_a_fresh_cache(engine):
    # The engine keeps the last request's KV cache and re-uses a shared prefix; the answer
    # must be the one an unrelated previous request (no shared prefix) leads to.
    params = SamplingParams(max_tokens=10, temperature=0)
    long = engine.prepare_completion("The capital of France is Paris. The capital of Spain is")
    _run(engine, engine.prepare_completion("Zebras graze"), params)
    fresh, _ = _run(engine, long, params)
    _run(engine, engine.prepare_completion("The capital of France is Paris. The"), params)
    reused, _ = _run(engine, long, params)
    again, _ = _run(engine, long, params)  # the whole prompt cached
    assert reused == fresh == again


def test_abandoned_generation_leaves_a_usable_cache(engine):
    prompt = engine.prepare_completion("Count: 1, 2, 3,")
    params = SamplingParams(max_tokens=8, temperature=0)
    expected, _ = _run(engine, prompt, params)
    gen = engine.generate(prompt, SamplingParams(max_tokens=50, temperature=0), CancelToken())
    next(gen)
    gen.close()
    assert _run(engine, prompt, params)[0] == expected


def test_repeat_penalty_changes_greedy_output(engine):
    prompt = engine.prepare_completion("apple apple apple apple apple")
    plain, _ = _run(engine, prompt, SamplingParams(max_tokens=8, temperature=0))
    penalised, _ = _run(engine, prompt, SamplingParams(max_tokens=8, temperature=0,
                                                       repeat_penalty=2.0,
                                                       presence_penalty=1.5))
    assert plain != penalised
