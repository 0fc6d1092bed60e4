"""Continuous batching for the llama.cpp engine: several sequences decoded in one batch.

``BatchedLlamaEngine`` owns one llama.cpp context with ``slots`` sequences (``n_seq_max``),
each with its own KV cells (``n_ctx`` per slot, not shared) and its own sampler chain
(penalties, grammar, top-k/p, min-p, temperature, seeded dist, or greedy: the order
llama-cpp-python's ``Llama.generate`` uses, so a slot samples as the one-sequence engine does).
One scheduler thread does every decode (ggml's thread team stays on one OS thread, see
``worker.py``): each step it admits waiting requests into free slots, packs one token per
decoding slot plus prompt chunks of the prefilling slots into one ``llama_batch`` of at most
``n_batch`` tokens, decodes it and samples every slot that has logits. A slot keeps its KV
cache after its request ends; a new request goes to the free slot that shares the longest
prompt prefix and only decodes the rest (llama-server's slot prompt cache does the same).

``generate`` may be called from any thread and from several at once: it queues the request
and yields its tokens through the shared loop (``token_stream.token_events``) on the caller's
thread, so stop strings, limits, UTF-8 and logprobs behave exactly as in the one-sequence
engine.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.runtimes.engine import (
    CancelToken,
    EngineError,
    FinishEvent,
    ModelInfo,
    Prompt,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
    generation_limit,
)
from edgepack.runtimes.llama_engine import LlamaEngine, LlamaSettings, token_logprob
from edgepack.runtimes.token_stream import token_events

_DEFAULT_SEED = 0xFFFFFFFF
_PENALTY_LAST_N = 64  # llama-cpp-python's last_n_tokens_size default
_END = None  # queued after a slot's last token


class _ModelHandle:
    """The parts of ``llama_cpp.Llama`` that LlamaEngine's prompt code reads."""

    def __init__(self, model: Any, n_ctx_slot: int) -> None:
        self._model = model
        self._n_ctx = n_ctx_slot
        self.metadata = dict(model.metadata())

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return list(self._model.tokenize(text, add_bos, special))

    def token_eos(self) -> int:
        return int(self._model.token_eos())

    def token_bos(self) -> int:
        return int(self._model.token_bos())

    def n_ctx(self) -> int:
        return self._n_ctx

    def n_embd(self) -> int:
        return int(self._model.n_embd())

    def n_vocab(self) -> int:
        return int(self._model.n_vocab())


@dataclass
class _Request:
    prompt: tuple[int, ...]
    params: SamplingParams
    limit: int
    out: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    closed: bool = False  # the consumer stopped reading: free the slot


@dataclass
class _Slot:
    seq: int
    cache: list[int] = field(default_factory=list)  # tokens whose KV this sequence holds
    req: _Request | None = None
    todo: list[int] = field(default_factory=list)  # prompt tokens still to decode
    sampler: Any = None
    n_out: int = 0
    last: int = -1  # the token sampled last, decoded in the next step


class BatchedLlamaEngine(LlamaEngine):
    """A LlamaEngine that decodes up to ``slots`` requests together."""

    def __init__(self, settings: LlamaSettings, slots: int) -> None:
        super().__init__(settings)
        if slots < 1:
            raise ValueError(f"slots must be at least 1, got {slots}")
        self.slots = slots
        self._ctx: Any = None
        self._batch: Any = None
        self._pending: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._slots: list[_Slot] = []
        self._failure: BaseException | None = None

    # -- loading -------------------------------------------------------------------------

    def load(self) -> ModelInfo:
        s = self.settings
        try:
            import llama_cpp
            from llama_cpp import _internals
        except ImportError as e:  # pragma: no cover - depends on the device's extras
            raise EngineError("the llama.cpp engine needs llama-cpp-python",
                              hint="pip install 'edgepack[serve,llama]'") from e
        if s.kind != "chat" and s.kind != "completion":
            raise EngineError(f"batched decoding serves chat and completion models, not {s.kind}")
        if not Path(s.model_path).is_file():
            raise EngineError(f"model file {s.model_path} does not exist")
        # llama-cpp-python prints every llama.cpp log line (about 1,000 at a context's first
        # graph) unless its logger is raised, which Llama(verbose=False) does and the low-level
        # objects used here do not: errors only, as the one-sequence engine gets.
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        try:
            mparams = llama_cpp.llama_model_default_params()
            mparams.n_gpu_layers = s.n_gpu_layers
            model = _internals.LlamaModel(path_model=str(s.model_path), params=mparams,
                                          verbose=False)
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = s.n_ctx * self.slots
            cparams.n_batch = cparams.n_ubatch = s.n_batch
            cparams.n_seq_max = self.slots
            cparams.kv_unified = False  # each slot gets n_ctx cells of its own
            cparams.n_threads = cparams.n_threads_batch = s.n_threads
            cparams.no_perf = True
            # The kernels the bundle was validated with, as LlamaEngine: a slot's greedy
            # output is the one-sequence engine's.
            cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if s.flash_attn
                                       else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
            ctx = _internals.LlamaContext(model=model, params=cparams, verbose=False)
        except (ValueError, RuntimeError, OSError) as e:
            raise EngineError(f"llama.cpp could not load {s.model_path}: {e}",
                              hint="check the file and that the device has the memory for "
                              f"{self.slots} slots of {s.n_ctx} tokens") from e
        llm = _ModelHandle(model, s.n_ctx)
        self._llm = llm
        self._ctx = ctx
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._token_to_piece = llama_cpp.llama_token_to_piece
        self._piece_buf = ctypes.create_string_buffer(256)
        self._batch = llama_cpp.llama_batch_init(s.n_batch, 0, self.slots)
        self._slots = [_Slot(seq=i) for i in range(self.slots)]
        if s.kind == "chat":
            self._template = self._chat_template(llm)
            self._template_source = llm.metadata.get("tokenizer.chat_template")
        self._thread = threading.Thread(target=self._run, name="edgepack-batch", daemon=True)
        self._thread.start()
        return ModelInfo(name=s.name, kind=s.kind, n_ctx=s.n_ctx, n_embd=llm.n_embd(),
                         details={"architecture": llm.metadata.get("general.architecture", ""),
                                  "n_params": model.n_params(), "size_bytes": model.size(),
                                  "slots": self.slots})

    @property
    def n_ctx(self) -> int:
        return self.settings.n_ctx

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(30)
        import llama_cpp

        for slot in self._slots:
            if slot.sampler is not None:
                slot.sampler.close()
                slot.sampler = None
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        handle: Any = self._llm
        self._llm = None  # type: ignore[assignment]
        if handle is not None:
            handle._model.close()

    # -- generation (any thread) -------------------------------------------------------------

    def generate(
        self, prompt: Prompt, params: SamplingParams, cancel: CancelToken
    ) -> Iterator[TokenEvent | FinishEvent]:
        llm = self._require()
        if params.grammar is not None:
            self.check_grammar(params.grammar)
        n_prompt = len(prompt.tokens)
        limit = generation_limit(self.n_ctx, n_prompt, params.max_tokens)
        req = _Request(prompt.tokens, params, limit)
        if limit > 0 and not cancel.cancelled:
            with self._cond:
                if self._failure is not None:
                    raise EngineError(f"the batch scheduler failed: {self._failure}")
                self._pending.append(req)
                self._cond.notify_all()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = llm._model.vocab
        is_eog = self._is_eog
        infos: dict[int, TokenLogprob] = {}

        def tokens() -> Iterator[int]:
            try:
                while True:
                    try:
                        item = req.out.get(timeout=0.05)
                    except queue.Empty:
                        if cancel.cancelled:
                            yield -1  # token_events sees the cancel before using it
                        continue
                    if item is _END:
                        return
                    if isinstance(item, BaseException):
                        raise EngineError(f"the batch scheduler failed: {item}") from item
                    token, info = item
                    if info is not None:
                        infos[token] = info
                    yield token
            finally:
                req.closed = True
                with self._cond:
                    self._cond.notify_all()

        describe = (lambda t: infos[t]) if params.logprobs is not None else None
        yield from token_events(
            tokens(),  # type: ignore[arg-type]
            lambda t: decoder.decode(self._piece(t)),
            lambda: decoder.decode(b"", final=True),
            n_prompt=n_prompt, limit=limit,
            stops=tuple(prompt.stop) + tuple(params.stop),
            cancel=cancel,
            is_end=lambda t: bool(is_eog(vocab, t)),
            describe=describe,
        )

    # -- the scheduler thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stop and not self._pending and not self._busy():
                        self._cond.wait()
                    if self._stop:
                        return
                    self._admit()
                self._step()
        except BaseException as e:  # noqa: BLE001 - every waiting consumer must hear of it
            self._failure = e
            for slot in self._slots:
                if slot.req is not None:
                    slot.req.out.put(e)
            with self._cond:
                for req in self._pending:
                    req.out.put(e)
                self._pending.clear()

    def _busy(self) -> bool:
        return any(s.req is not None for s in self._slots)

    def _admit(self) -> None:
        import llama_cpp

        mem = self._ctx.memory
        while self._pending:
            free = [s for s in self._slots if s.req is None]
            if not free:
                return
            req = self._pending.popleft()
            if req.closed:
                continue
            slot = max(free, key=lambda s: _common_prefix(s.cache, req.prompt))
            keep = _common_prefix(slot.cache, req.prompt)
            if keep == len(req.prompt):
                keep -= 1  # decode the last prompt token again: its logits start the answer
            llama_cpp.llama_memory_seq_rm(mem, slot.seq, keep, -1)
            del slot.cache[keep:]
            slot.req = req
            slot.todo = list(req.prompt[keep:])
            slot.n_out = 0
            slot.last = -1
            if slot.sampler is not None:
                slot.sampler.close()
            slot.sampler = self._sampler(req.params)

    def _sampler(self, p: SamplingParams) -> Any:
        from llama_cpp import _internals

        model = self._llm._model
        sampler = _internals.LlamaSampler()
        sampler.add_penalties(n_vocab=model.n_vocab(), penalty_last_n=_PENALTY_LAST_N,
                              penalty_repeat=p.repeat_penalty, penalty_freq=p.frequency_penalty,
                              penalty_present=p.presence_penalty)
        if p.grammar is not None:
            from llama_cpp.llama_grammar import LlamaGrammar

            sampler.add_grammar(model, LlamaGrammar.from_string(p.grammar))
        seed = _DEFAULT_SEED if p.seed is None else p.seed & 0xFFFFFFFF
        if p.temperature == 0.0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(p.top_k)
            sampler.add_typical(1.0, 1)
            sampler.add_top_p(p.top_p, 1)
            sampler.add_min_p(p.min_p, 1)
            sampler.add_temp(p.temperature)
            sampler.add_dist(seed)
        return sampler

    def _step(self) -> None:
        import llama_cpp

        batch = self._batch
        budget = self.settings.n_batch
        n = 0
        sample_at: list[tuple[_Slot, int]] = []
        for slot in self._slots:
            req = slot.req
            if req is None:
                continue
            if req.closed:
                self._release(slot)
                continue
            if slot.todo or slot.last < 0:
                continue
            _put(batch, n, slot.last, len(slot.cache), slot.seq, True)
            slot.cache.append(slot.last)
            sample_at.append((slot, n))
            n += 1
        budget -= n
        for slot in self._slots:
            if slot.req is None or not slot.todo or budget <= 0:
                continue
            chunk = slot.todo[:budget]
            del slot.todo[: len(chunk)]
            for i, tok in enumerate(chunk):
                last = not slot.todo and i == len(chunk) - 1
                _put(batch, n, tok, len(slot.cache), slot.seq, last)
                slot.cache.append(tok)
                if last:
                    sample_at.append((slot, n))
                n += 1
            budget -= len(chunk)
        if n == 0:
            return
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self._ctx.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {n} tokens")
        is_eog, vocab = self._is_eog, self._llm._model.vocab
        for slot, idx in sample_at:
            req = slot.req
            assert req is not None
            token = llama_cpp.llama_sampler_sample(slot.sampler.sampler, self._ctx.ctx, idx)
            info = self._logprob(idx, token, req.params.logprobs) \
                if req.params.logprobs is not None else None
            req.out.put((token, info))
            slot.n_out += 1
            slot.last = token
            if is_eog(vocab, token) or slot.n_out >= req.limit:
                req.out.put(_END)
                self._release(slot)

    def _release(self, slot: _Slot) -> None:
        # The KV cache stays: the next request with the same prefix reuses it.
        slot.req = None
        slot.todo = []
        slot.last = -1

    def _piece(self, token: int) -> bytes:
        # Called from the scheduler and from every consumer thread: no shared buffer.
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(256)
            n = self._token_to_piece(self._llm._model.vocab, token, buf, len(buf), 0, False)
            piece = bytes(buf.raw[: max(n, 0)])
            self._pieces[token] = piece
        return piece

    def _logprob(self, idx: int, token: int, n_top: int) -> TokenLogprob:
        import numpy as np

        logits = np.ctypeslib.as_array(self._ctx.get_logits_ith(idx),
                                       shape=(self._llm.n_vocab(),))
        return token_logprob(logits, token, n_top, self._piece)


def _put(batch: Any, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq
    batch.logits[i] = logits


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):  # noqa: B905 - lengths differ by design
        if x != y:
            break
        n += 1
    return n
