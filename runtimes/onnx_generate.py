"""The decoder loop for ONNX LLMs exported by optimum with past key values.

Device side: numpy and the standard library only (onnxruntime sessions and ``tokenizers``
objects are passed in).

The graph (optimum ``text-generation-with-past``) takes ``input_ids``, ``attention_mask``
(past + new positions), ``position_ids`` when the architecture uses them, and
``past_key_values.N.key/value``; it returns ``logits`` and ``present.N.key/value``, which are
fed back as the next step's past.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Prompt tokens per prefill step. The graph returns logits for every position it is fed: a
# 2,000-token prompt in one step would allocate 2,000 x vocab floats (390 MB for a 49k vocab).
PREFILL_CHUNK = 128
_PAST_PREFIX = "past_key_values"
_PRESENT_PREFIX = "present"


@dataclass(frozen=True)
class KvSpec:
    """The past-key-value inputs of a graph: names, dtype and the per-layer shape after batch."""

    names: tuple[str, ...]
    dtypes: tuple[Any, ...]
    heads_dims: tuple[tuple[int, int], ...]  # (kv heads, head dim) per input
    present_to_past: dict[str, str]


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def kv_spec(session: Any) -> KvSpec:
    """Read the KV inputs/outputs of an optimum decoder graph; ValueError if it has none."""
    names, dtypes, dims = [], [], []
    for i in session.get_inputs():
        if not i.name.startswith(_PAST_PREFIX):
            continue
        shape = i.shape  # [batch, kv_heads, past_len, head_dim]
        if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise ValueError(f"past input {i.name} has shape {shape}, expected [b, h, t, d]")
        names.append(i.name)
        dtypes.append(_ORT_TYPES.get(i.type, np.float32))
        dims.append((shape[1], shape[3]))
    if not names:
        raise ValueError("the graph has no past_key_values inputs (export with -with-past)")
    mapping = {}
    for o in session.get_outputs():
        if o.name.startswith(_PRESENT_PREFIX):
            past = _PAST_PREFIX + o.name[len(_PRESENT_PREFIX) :]
            if past in names:
                mapping[o.name] = past
    if len(mapping) != len(names):
        raise ValueError("the graph's present.* outputs do not match its past_key_values inputs")
    return KvSpec(tuple(names), tuple(dtypes), tuple(dims), mapping)


class KvDecoder:
    """Runs one sequence through the graph, keeping its KV cache between calls."""

    def __init__(self, session: Any, spec: KvSpec) -> None:
        self._session = session
        self._spec = spec
        inputs = {i.name for i in session.get_inputs()}
        self._wants_positions = "position_ids" in inputs
        self._wants_mask = "attention_mask" in inputs
        self._outputs = ["logits", *spec.present_to_past.keys()]
        self.reset()

    def reset(self) -> None:
        self.past_len = 0
        self._past = {
            name: np.zeros((1, h, 0, d), dtype=dt)
            for name, dt, (h, d) in zip(
                self._spec.names, self._spec.dtypes, self._spec.heads_dims, strict=True
            )
        }

    def feed(self, tokens: Sequence[int]) -> np.ndarray:
        """Append ``tokens`` to the sequence; return the logits (fp32) of the last position."""
        logits = None
        for start in range(0, len(tokens), PREFILL_CHUNK):
            chunk = np.asarray(tokens[start : start + PREFILL_CHUNK], dtype=np.int64)[None, :]
            n = chunk.shape[1]
            feeds: dict[str, np.ndarray] = {"input_ids": chunk, **self._past}
            if self._wants_mask:
                feeds["attention_mask"] = np.ones((1, self.past_len + n), dtype=np.int64)
            if self._wants_positions:
                feeds["position_ids"] = np.arange(
                    self.past_len, self.past_len + n, dtype=np.int64
                )[None, :]
            out = self._session.run(self._outputs, feeds)
            logits = out[0][0, -1, :]
            self._past = {
                self._spec.present_to_past[name]: value
                for name, value in zip(self._outputs[1:], out[1:], strict=True)
            }
            self.past_len += n
        if logits is None:
            raise ValueError("feed() needs at least one token")
        return logits.astype(np.float32, copy=False)


class Sampler:
    """llama.cpp's sampler chain in numpy: penalties, top-k, top-p, min-p, temperature.

    ``temperature <= 0`` is greedy (argmax). A seed gives the same tokens every run.
    """

    def __init__(
        self,
        *,
        temperature: float,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        repeat_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.min_p = min_p
        self.repeat_penalty = repeat_penalty
        self.frequency_penalty = frequency_penalty
        self.presence_penalty = presence_penalty
        self._rng = np.random.default_rng(seed)
        self._counts: dict[int, int] = {}

    def accept(self, token: int) -> None:
        """Record a generated token for the repetition penalties."""
        self._counts[token] = self._counts.get(token, 0) + 1

    def sample(self, logits: np.ndarray) -> int:
        logits = self._penalised(logits)
        if self.temperature <= 0:
            return int(np.argmax(logits))
        ids = np.argsort(-logits, kind="stable")
        if self.top_k > 0:
            ids = ids[: self.top_k]
        vals = logits[ids].astype(np.float64)
        probs = np.exp(vals - vals[0])
        probs /= probs.sum()
        if 0.0 < self.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (at least one token).
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p) + 1)
            ids, vals, probs = ids[:keep], vals[:keep], probs[:keep]
        if self.min_p > 0.0:
            mask = probs >= self.min_p * probs[0]
            ids, vals = ids[mask], vals[mask]
        scaled = vals / self.temperature
        p = np.exp(scaled - scaled.max())
        p /= p.sum()
        return int(ids[self._rng.choice(len(ids), p=p)])

    def _penalised(self, logits: np.ndarray) -> np.ndarray:
        if not self._counts or (
            self.repeat_penalty == 1.0
            and self.frequency_penalty == 0.0
            and self.presence_penalty == 0.0
        ):
            return logits
        out = logits.copy()
        ids = np.fromiter(self._counts.keys(), dtype=np.int64)
        counts = np.fromiter(self._counts.values(), dtype=np.float32)
        ids_ok = ids < out.shape[0]
        ids, counts = ids[ids_ok], counts[ids_ok]
        vals = out[ids]
        if self.repeat_penalty != 1.0:
            vals = np.where(vals > 0, vals / self.repeat_penalty, vals * self.repeat_penalty)
        vals = vals - counts * self.frequency_penalty - self.presence_penalty
        out[ids] = vals
        return out


class Detokenizer:
    """Turns a growing list of token ids into text pieces, never splitting a character.

    Byte-level BPE tokens can end in the middle of a UTF-8 character; decoding such a prefix
    gives U+FFFD. Each step decodes a short window (from ``prefix`` to the end) and emits the
    new text only once it no longer ends in U+FFFD (the approach of vLLM's detokenizer).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, token: int) -> str:
        self._ids.append(token)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Text still held back at the end (an incomplete character shows as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True) if ids else ""


def generate_tokens(
    decoder: KvDecoder,
    prompt: Sequence[int],
    sampler: Sampler,
    *,
    limit: int,
    eos_ids: frozenset[int],
) -> Iterator[int]:
    """Yield up to ``limit`` sampled tokens after ``prompt``; stop before an EOS token.

    The caller stops early by closing the iterator; the decoder's cache is reset first, so one
    decoder serves one generation at a time.
    """
    decoder.reset()
    if limit <= 0:
        return
    logits = decoder.feed(prompt)
    for i in range(limit):
        token = sampler.sample(logits)
        if token in eos_ids:
            return
        sampler.accept(token)
        yield token
        if i + 1 < limit:
            logits = decoder.feed([token])
