"""The llama.cpp engine, through llama-cpp-python.

Device side. ``llama_cpp`` is imported when the engine loads, so the server's other modules
import on a machine without it (the ONNX engine's devices).

Settings that matter (measured, issue #5): ``logits_all`` stays off (on, it keeps a
vocab-sized row per context position: 1.7 GB on gemma-3-270m); ``n_ctx`` is always explicit
(llama-cpp-python's default is 512); and every decode runs on the same OS thread, because
ggml's OpenMP workers busy-wait for the thread that fed them last and decode speed halves
when successive tokens come from different Python threads (see ``worker.py``).
"""

from __future__ import annotations

import codecs
import ctypes
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.runtimes.engine import (
    FEATURE_GRAMMAR,
    FEATURE_LOGPROBS,
    FEATURE_TOOLS,
    CancelToken,
    EngineError,
    FinishEvent,
    ModelInfo,
    Prompt,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
    fitted,
    generation_limit,
    not_for_chat,
    not_for_completion,
    not_for_embeddings,
)
from edgepack.runtimes.token_stream import token_events

_DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed per generation


@dataclass(frozen=True)
class LlamaSettings:
    """What ``Llama()`` is built with; comes from server.toml's [engine] table."""

    model_path: Path
    name: str
    kind: str  # chat | completion | embedding
    n_ctx: int
    n_threads: int
    n_batch: int = 512
    n_gpu_layers: int = 0
    # Flash attention (chat/completion only): what the build validated the bundle with, since
    # it can change a near-tie greedy answer (SmolLM2-135M Q8_0: "Paris" without, "L'Étoile"
    # with). llama-cpp-python's default is off.
    flash_attn: bool = False


class LlamaEngine:
    """An ``Engine`` over one GGUF file."""

    def __init__(self, settings: LlamaSettings) -> None:
        self.settings = settings
        self._llm: Any = None
        self._template: Any = None
        self._is_eog: Any = None
        self._pieces: dict[int, bytes] = {}
        self._piece_buf: Any = None
        self._template_source: str | None = None

    # -- loading -------------------------------------------------------------------------

    def load(self) -> ModelInfo:
        s = self.settings
        try:
            import llama_cpp
        except ImportError as e:  # pragma: no cover - depends on the device's extras
            raise EngineError(
                "the llama.cpp engine needs llama-cpp-python, which is not installed",
                hint="pip install 'edgepack[serve,llama]'",
            ) from e
        if not s.model_path.is_file():
            raise EngineError(f"model file {s.model_path} does not exist")
        try:
            llm = llama_cpp.Llama(
                model_path=str(s.model_path),
                n_ctx=s.n_ctx,
                n_threads=s.n_threads,
                n_threads_batch=s.n_threads,
                n_batch=s.n_batch,
                n_ubatch=s.n_batch,
                n_gpu_layers=s.n_gpu_layers,
                logits_all=False,
                embedding=s.kind == "embedding",
                flash_attn=s.flash_attn and s.kind != "embedding",
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as e:
            raise EngineError(
                f"llama.cpp could not load {s.model_path}: {e}",
                hint="check that the file is a GGUF this llama-cpp-python version reads and "
                "that the device has the memory the plan expects",
            ) from e
        self._llm = llm
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._token_to_piece = llama_cpp.llama_token_to_piece
        self._piece_buf = ctypes.create_string_buffer(256)
        if s.kind == "chat":
            self._template = self._chat_template(llm)
            self._template_source = llm.metadata.get("tokenizer.chat_template")
        meta = dict(llm.metadata)
        return ModelInfo(
            name=s.name,
            kind=s.kind,
            n_ctx=llm.n_ctx(),
            n_embd=llm.n_embd(),
            details={
                "architecture": meta.get("general.architecture", ""),
                "n_params": llm._model.n_params(),
                "size_bytes": llm._model.size(),
            },
        )

    @staticmethod
    def _chat_template(llm: Any) -> Any:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            # No silent fallback to some other model family's template.
            raise EngineError(
                "the bundle's model kind is 'chat' but the GGUF has no tokenizer.chat_template",
                hint="rebuild the bundle from a model with a chat template, or set "
                "kind = \"completion\" in server.toml",
            )
        eos_id, bos_id = llm.token_eos(), llm.token_bos()
        model = llm._model
        return Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_get_text(eos_id) if eos_id != -1 else "",
            bos_token=model.token_get_text(bos_id) if bos_id != -1 else "",
            add_generation_prompt=True,
        )

    def warm_up(self) -> None:
        llm = self._require()
        if self.settings.kind == "embedding":
            self.embed(["warm up"])
            return
        prompt = (
            self.prepare_chat([{"role": "user", "content": "Hi"}])
            if self.settings.kind == "chat"
            else self.prepare_completion("Hello")
        )
        params = SamplingParams(max_tokens=2, temperature=0.0)
        for _ in self.generate(prompt, params, CancelToken()):
            pass
        del llm

    @property
    def n_ctx(self) -> int:
        return self.settings.n_ctx if self._llm is None else int(self._llm.n_ctx())

    def _require(self) -> Any:
        if self._llm is None:
            raise EngineError("the engine is not loaded")
        return self._llm

    @property
    def features(self) -> frozenset[str]:
        return frozenset({FEATURE_GRAMMAR, FEATURE_LOGPROBS, FEATURE_TOOLS})

    @property
    def chat_template(self) -> str | None:
        return self._template_source

    # -- prompts ---------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self._require().tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def check_grammar(self, grammar: str) -> None:
        # llama.cpp's parser returns NULL (and logs why on stderr) for a grammar it cannot
        # use; a NULL added to a sampler chain would crash the process, so every grammar is
        # parsed here first, where a failure is the client's 400. Reads only the vocabulary.
        import llama_cpp

        llm = self._require()
        sampler = llama_cpp.llama_sampler_init_grammar(
            llm._model.vocab, grammar.encode("utf-8"), b"root"
        )
        if not sampler:
            raise ValueError(
                "llama.cpp could not parse the grammar (GBNF, with a 'root' rule; see "
                "https://github.com/ggml-org/llama.cpp/blob/master/grammars/README.md)"
            )
        llama_cpp.llama_sampler_free(sampler)

    def prepare_chat(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
    ) -> Prompt:
        llm = self._require()
        if self._template is None:
            raise not_for_chat(self.settings.name, self.settings.kind)
        try:
            rendered = self._template(messages=list(messages),
                                      tools=list(tools) if tools else None)
        except Exception as e:  # noqa: BLE001 - jinja raises many kinds; all mean bad input
            raise ValueError(f"the model's chat template rejected the messages: {e}") from e
        # The template writes BOS itself when the model wants one (added_special=True).
        tokens = llm.tokenize(
            rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
        )
        stops = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop]
        return fitted(Prompt(tuple(tokens), tuple(s for s in stops if s)), self.n_ctx)

    def prepare_completion(self, text: str) -> Prompt:
        llm = self._require()
        if self.settings.kind == "embedding":
            raise not_for_completion(self.settings.name)
        add_bos = bool(llm._model.add_bos_token())
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
        return fitted(Prompt(tuple(tokens)), self.n_ctx)

    # -- generation ------------------------------------------------------------------------

    def generate(
        self, prompt: Prompt, params: SamplingParams, cancel: CancelToken
    ) -> Iterator[TokenEvent | FinishEvent]:
        llm = self._require()
        n_prompt = len(prompt.tokens)
        limit = generation_limit(self.n_ctx, n_prompt, params.max_tokens)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = llm._model.vocab
        is_eog = self._is_eog
        llm.set_seed(_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF)
        grammar = None
        if params.grammar is not None:
            from llama_cpp.llama_grammar import LlamaGrammar

            self.check_grammar(params.grammar)
            grammar = LlamaGrammar.from_string(params.grammar)
        tokens = llm.generate(
            list(prompt.tokens),
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            grammar=grammar,
        )
        describe = None
        if params.logprobs is not None:
            describe = self._logprob_reader(params.logprobs)
        yield from token_events(
            tokens,
            lambda t: decoder.decode(self._piece(t)),
            lambda: decoder.decode(b"", final=True),
            n_prompt=n_prompt,
            limit=limit,
            stops=tuple(prompt.stop) + tuple(params.stop),
            cancel=cancel,
            is_end=lambda t: bool(is_eog(vocab, t)),
            describe=describe,
        )

    def _logprob_reader(self, n_top: int) -> Any:
        # The logits of the last decoded position are those that produced the token just
        # sampled: llama-cpp-python yields each token before it decodes the next one.
        import numpy as np

        llm = self._llm
        n_vocab = llm.n_vocab()

        def describe(token: int) -> TokenLogprob:
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
            return token_logprob(logits, token, n_top, self._piece)

        return describe

    def _piece(self, token: int) -> bytes:
        # The bytes of one token, cached: the vocabulary is fixed once loaded.
        piece = self._pieces.get(token)
        if piece is None:
            buf = self._piece_buf
            n = self._token_to_piece(self._llm._model.vocab, token, buf, len(buf), 0, False)
            piece = bytes(buf.raw[: max(n, 0)])
            self._pieces[token] = piece
        return piece

    # -- embeddings ------------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        llm = self._require()
        if self.settings.kind != "embedding":
            raise not_for_embeddings(self.settings.name, self.settings.kind)
        vectors, n_tokens = llm.embed(list(texts), normalize=True, truncate=False,
                                      return_count=True)
        return vectors, int(n_tokens)

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None


def token_logprob(logits: Any, token: int, n_top: int,
                  piece: Callable[[int], bytes]) -> TokenLogprob:
    """The log-probability of ``token`` and the ``n_top`` likeliest tokens, from one
    position's raw logits (a numpy view), computed in float64 with a stable log-softmax."""
    import numpy as np

    values = np.asarray(logits, dtype=np.float64)
    peak = values.max()
    logp = values - (peak + np.log(np.exp(values - peak).sum()))
    top: tuple[tuple[bytes, float], ...] = ()
    if n_top > 0:
        ids = np.argpartition(-logp, n_top)[:n_top]
        ids = ids[np.argsort(-logp[ids])]
        top = tuple((piece(int(i)), float(logp[i])) for i in ids)
    return TokenLogprob(piece(token), float(logp[token]), top)
