"""The engine interface: what the server needs from an inference backend.

Device side: standard library only. llama.cpp (``llama_engine.py``) implements it now; an
onnxruntime engine implements the same Protocol later.

Threading contract: the server calls ``load``, ``warm_up``, ``generate`` and ``embed`` on one
dedicated worker thread only (see ``worker.py``), one call at a time. ``prepare_chat``,
``prepare_completion`` and ``count_tokens`` only read the tokenizer and may be called from any
thread while a generation runs (llama-server also tokenizes on its HTTP threads).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from edgepack.errors import RuntimeHealthError

# What an engine can do beyond plain sampling; the server refuses a request that needs more.
FEATURE_GRAMMAR = "grammar"  # GBNF-constrained sampling (response_format, grammar, forced tools)
FEATURE_LOGPROBS = "logprobs"
FEATURE_TOOLS = "tools"  # chat templates rendered with `tools`

# Why a generation ended. "stop": end-of-generation token or a stop sequence; "length":
# max_tokens or the context is full; "cancelled": the client went away or the server drains.
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"


class EngineError(RuntimeHealthError):
    """The engine failed: it could not load, or a call broke it (the server turns unready)."""


class PromptTooLongError(ValueError):
    """The prompt (plus the tokens asked for) does not fit the context window."""

    def __init__(self, prompt_tokens: int, n_ctx: int) -> None:
        super().__init__(
            f"the prompt is {prompt_tokens} tokens but the model's context is {n_ctx} tokens; "
            "shorten the prompt (or serve the bundle with a larger --ctx)"
        )
        self.prompt_tokens = prompt_tokens
        self.n_ctx = n_ctx


def fitted(prompt: Prompt, n_ctx: int) -> Prompt:
    """``prompt`` if it leaves at least one position free for the first generated token."""
    if len(prompt.tokens) >= n_ctx:
        raise PromptTooLongError(len(prompt.tokens), n_ctx)
    return prompt


def generation_limit(n_ctx: int, n_prompt: int, max_tokens: int | None) -> int:
    """How many tokens may be generated: max_tokens, capped by the room left in the context."""
    room = n_ctx - n_prompt
    return room if max_tokens is None else min(max_tokens, room)


def not_for_chat(name: str, kind: str) -> ValueError:
    return ValueError(
        f"model {name!r} is a {kind} model; use /v1/completions or /v1/embeddings"
    )


def not_for_completion(name: str) -> ValueError:
    return ValueError(f"model {name!r} is an embedding model; use /v1/embeddings")


def not_for_embeddings(name: str, kind: str) -> ValueError:
    return ValueError(f"model {name!r} is a {kind} model, not an embedding model")


@dataclass(frozen=True)
class Prompt:
    """A prompt ready to decode: its tokens and the stop strings its template implies."""

    tokens: tuple[int, ...]
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; defaults follow llama-server's so users of llama.cpp see no change."""

    max_tokens: int | None = None  # None: until end-of-generation or the context is full
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # A GBNF grammar (llama.cpp's format) every sampled token must keep the text inside;
    # structured output and forced tool calls compile to one (see structured.py, tools.py).
    grammar: str | None = None
    # None: no log-probabilities; N >= 0: each token's log-probability and its N most likely
    # alternatives, from the model's distribution before sampling (as llama-server reports).
    logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its bytes, its log-probability and the most likely alternatives."""

    piece: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True)
class TokenEvent:
    """Text produced by one or more tokens (multi-byte characters may span tokens)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when SamplingParams.logprobs


@dataclass(frozen=True)
class FinishEvent:
    """The end of a generation, with OpenAI's usage counts."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)  # prefill_s, decode_s


@dataclass(frozen=True)
class ModelInfo:
    """What the server reports about the loaded model."""

    name: str
    kind: str  # chat | completion | embedding
    n_ctx: int
    n_embd: int
    details: dict[str, Any] = field(default_factory=dict)


class CancelToken:
    """Set from any thread; the engine checks it between tokens and stops at once."""

    __slots__ = ("_event", "reason")

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._event.is_set():
            self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@runtime_checkable
class Engine(Protocol):
    """An inference backend the server can drive."""

    def load(self) -> ModelInfo:
        """Load the model; raise EngineError naming the file and the cause."""
        ...

    def warm_up(self) -> None:
        """Run one real inference so the first request does not pay for lazy setup."""
        ...

    @property
    def n_ctx(self) -> int: ...

    @property
    def features(self) -> frozenset[str]:
        """The FEATURE_* this engine implements."""
        ...

    @property
    def chat_template(self) -> str | None:
        """The model's chat template source (None: not a chat model or none shipped)."""
        ...

    def count_tokens(self, text: str) -> int: ...

    def check_grammar(self, grammar: str) -> None:
        """Raise ValueError when ``grammar`` is not a GBNF grammar this engine can sample with."""
        ...

    def prepare_chat(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
    ) -> Prompt:
        """Apply the model's chat template (with ``tools`` when given) and tokenize.

        ValueError when the messages don't fit the template.
        """
        ...

    def prepare_completion(self, text: str) -> Prompt: ...

    def generate(
        self, prompt: Prompt, params: SamplingParams, cancel: CancelToken
    ) -> Iterator[TokenEvent | FinishEvent]:
        """Yield text as it is decoded, then exactly one FinishEvent.

        Stops between tokens once ``cancel`` is set (FinishEvent reason "cancelled").
        """
        ...

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """Embed each text; return the vectors and the number of tokens read."""
        ...

    def close(self) -> None: ...
