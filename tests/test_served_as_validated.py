"""What the server answers is what the build validated (real llama.cpp, no HTTP).

The build's golden-prompt check (``edgepack.build.gguf_validate.answer_golden``) and the
server's two llama.cpp engines must decode with the same kernels: SmolLM2-135M Q8_0's first
answer token to the default golden question is a near-tie, and with flash attention on in the
engines (not in the validator) the served answer was "L'Étoile, la Cité…" while the build had
validated "The capital of France is Paris." This test fails if the engines and the validator
drift apart again.
"""

from __future__ import annotations

import pytest
from edgepack.runtimes.batch import BatchedLlamaEngine
from edgepack.runtimes.engine import CancelToken, SamplingParams, TokenEvent
from edgepack.runtimes.llama_engine import LlamaEngine, LlamaSettings
from support.gguf_repo import FILES, smollm2_gguf_repo

from edgepack.build.gguf_validate import ANSWER_TOKENS, GoldenPrompt, answer_golden, load_model

pytestmark = pytest.mark.slow

QUESTION = GoldenPrompt("What is the capital of France?", "Paris")


@pytest.fixture(scope="module")
def q8_0():
    return smollm2_gguf_repo() / FILES["Q8_0"]


@pytest.fixture(scope="module")
def validated(q8_0):
    llm = load_model(q8_0, 2, 512)
    try:
        return answer_golden(llm, QUESTION)
    finally:
        llm.close()


def _served(engine) -> str:
    engine.load()
    try:
        prompt = engine.prepare_chat([{"role": "user", "content": QUESTION.prompt}])
        params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0)
        return "".join(ev.text for ev in engine.generate(prompt, params, CancelToken())
                       if isinstance(ev, TokenEvent)).strip()
    finally:
        engine.close()


@pytest.mark.parametrize("slots", [None, 2])
def test_the_served_greedy_answer_is_the_validated_one(q8_0, validated, slots):
    settings = LlamaSettings(q8_0, "smollm2", "chat", n_ctx=512, n_threads=2)
    engine = LlamaEngine(settings) if slots is None else BatchedLlamaEngine(settings, slots)
    assert validated["passed"], validated  # the build would ship this file
    assert _served(engine) == validated["answer"]
