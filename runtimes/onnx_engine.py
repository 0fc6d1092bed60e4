"""The onnxruntime engine: embeddings and decoder LLMs from an ONNX bundle.

Device side: onnxruntime, tokenizers, numpy, the standard library and edgepack's own device
modules; jinja2 (a llama-cpp-python dependency) renders chat templates when a chat model is
served. Never torch, transformers, optimum or huggingface_hub (a test checks it).

What the engine reads (written by ``edgepack.build.onnx_export``)::

    model/model.onnx (+ model.onnx_data)
    tokenizer/tokenizer.json            padding and truncation off; the engine pads per batch
    tokenizer/edgepack_tokenizer.json   kind, pooling, normalize, max_length, eos ids,
                                        chat template, n_ctx
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edgepack.runtimes.engine import (
    FEATURE_TOOLS,
    CancelToken,
    EngineError,
    FinishEvent,
    ModelInfo,
    Prompt,
    SamplingParams,
    TokenEvent,
    fitted,
    generation_limit,
    not_for_chat,
    not_for_completion,
    not_for_embeddings,
)
from edgepack.runtimes.onnx_generate import (
    Detokenizer,
    KvDecoder,
    Sampler,
    generate_tokens,
    kv_spec,
)
from edgepack.runtimes.token_stream import token_events

TOKENIZER_CONFIG_NAME = "edgepack_tokenizer.json"
# Texts per onnxruntime call when embedding: bounds activation memory on small devices.
EMBED_BATCH = 32
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}


@dataclass(frozen=True)
class OnnxSettings:
    """What the engine is built with; comes from server.toml's [engine] table.

    ``kind`` is the server's: chat | completion | embedding. ``n_ctx`` 0 means the model's own
    (``n_ctx`` in edgepack_tokenizer.json). ``providers`` in priority order, by onnxruntime
    name or alias (cpu, cuda, tensorrt); every one must be available.
    """

    model_path: Path
    tokenizer_dir: Path
    name: str
    kind: str
    n_ctx: int = 0
    n_threads: int = 0  # 0: onnxruntime's default (all cores)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)

    @classmethod
    def from_bundle(cls, bundle_dir: str | Path, **kwargs: Any) -> OnnxSettings:
        """Settings for the standard bundle layout (model/model.onnx, tokenizer/)."""
        root = Path(bundle_dir)
        return cls(model_path=root / "model" / "model.onnx", tokenizer_dir=root / "tokenizer",
                   **kwargs)


def resolve_providers(requested: Sequence[str], available: Sequence[str]) -> list[str]:
    """Map aliases to onnxruntime names; EngineError (exit 7) naming any that is missing."""
    names = [PROVIDER_ALIASES.get(p.lower(), p) for p in requested] or ["CPUExecutionProvider"]
    missing = [n for n in names if n not in available]
    if missing:
        raise EngineError(
            f"execution provider(s) {missing} requested but this onnxruntime offers only "
            f"{list(available)}",
            hint="install the onnxruntime build for this device (onnxruntime-gpu, or "
            "NVIDIA's Jetson wheel for CUDA/TensorRT), or serve with providers = [\"cpu\"]",
        )
    return names


class OnnxEngine:
    """An ``Engine`` over one ONNX graph and a ``tokenizers`` tokenizer."""

    def __init__(self, settings: OnnxSettings) -> None:
        self.settings = settings
        self._session: Any = None
        self._tokenizer: Any = None
        self._config: dict[str, Any] = {}
        self._decoder: KvDecoder | None = None
        self._template: Any = None
        self._input_names: set[str] = set()

    # -- loading -------------------------------------------------------------------------

    def load(self) -> ModelInfo:
        s = self.settings
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - depends on the device's extras
            raise EngineError(
                f"the ONNX engine needs onnxruntime and tokenizers ({e})",
                hint="pip install 'edgepack[serve,onnx]'",
            ) from e
        for path in (s.model_path, s.tokenizer_dir / "tokenizer.json",
                     s.tokenizer_dir / TOKENIZER_CONFIG_NAME):
            if not path.is_file():
                raise EngineError(f"{path} does not exist", hint="rebuild the bundle")
        self._config = json.loads((s.tokenizer_dir / TOKENIZER_CONFIG_NAME).read_text("utf-8"))
        providers = resolve_providers(s.providers, ort.get_available_providers())
        opts = ort.SessionOptions()
        if s.n_threads > 0:
            opts.intra_op_num_threads = s.n_threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(str(s.model_path), opts, providers=providers)
            self._tokenizer = Tokenizer.from_file(str(s.tokenizer_dir / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise EngineError(
                f"onnxruntime could not load {s.model_path}: {type(e).__name__}: {e}",
                hint="check that the bundle was built for this engine version and device",
            ) from e
        self._input_names = {i.name for i in self._session.get_inputs()}
        if s.kind == "embedding":
            # As sentence-transformers: truncate at max_seq_length; the tokenizer's
            # post-processor still adds the closing special token ([SEP]) after truncating.
            self._tokenizer.enable_truncation(int(self._config.get("max_length") or 512))
        n_embd = int(self._config.get("hidden_size") or 0)
        if s.kind in ("chat", "completion"):
            try:
                self._decoder = KvDecoder(self._session, kv_spec(self._session))
            except ValueError as e:
                raise EngineError(
                    f"{s.model_path} is not a decoder graph with a KV cache: {e}",
                    hint="the bundle's kind says it generates text; rebuild it with "
                    "task text-generation",
                ) from e
            if s.kind == "chat":
                self._template = self._chat_template()
        elif s.kind == "embedding":
            if self._config.get("kind") != "embedding":
                raise EngineError(
                    f"server kind 'embedding' but the bundle's model is "
                    f"{self._config.get('kind')!r}",
                    hint="serve this bundle as chat or completion",
                )
            out = self._session.get_outputs()[0]
            if not n_embd and isinstance(out.shape[-1], int):
                n_embd = out.shape[-1]
        else:
            raise EngineError(f"unknown model kind {s.kind!r} for the ONNX engine",
                              hint="use chat, completion or embedding in server.toml")
        return ModelInfo(
            name=s.name,
            kind=s.kind,
            n_ctx=self.n_ctx,
            n_embd=n_embd,
            details={
                "providers": self._session.get_providers(),
                "size_bytes": _graph_bytes(s.model_path),
                "model_type": self._config.get("model_type"),
            },
        )

    def _chat_template(self) -> Any:
        source = self._config.get("chat_template")
        if not source:
            raise EngineError(
                "the bundle's model kind is 'chat' but its tokenizer has no chat_template",
                hint="rebuild from a model with a chat template, or set kind = "
                "\"completion\" in server.toml",
            )
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:  # pragma: no cover - jinja2 comes with llama-cpp-python
            raise EngineError("chat templates need jinja2", hint="pip install jinja2") from e

        def raise_exception(message: str) -> None:
            raise ValueError(message)

        # The same environment settings as transformers' apply_chat_template.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        return env.from_string(source)

    def warm_up(self) -> None:
        if self.settings.kind == "embedding":
            self.embed(["warm up"])
            return
        prompt = (
            self.prepare_chat([{"role": "user", "content": "Hi"}])
            if self.settings.kind == "chat"
            else self.prepare_completion("Hello")
        )
        for _ in self.generate(prompt, SamplingParams(max_tokens=2, temperature=0.0),
                               CancelToken()):
            pass

    @property
    def n_ctx(self) -> int:
        own = int(self._config.get("n_ctx") or self._config.get("max_length") or 0)
        if self.settings.n_ctx > 0:
            return min(self.settings.n_ctx, own) if own else self.settings.n_ctx
        return own or 2048

    def _require(self) -> Any:
        if self._session is None:
            raise EngineError("the engine is not loaded")
        return self._session

    # -- prompts ---------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        self._require()
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    @property
    def features(self) -> frozenset[str]:
        # Tool calls are rendered by the template and parsed by the server; sampling here is
        # plain numpy, without a grammar engine, so forced calls and structured output are not.
        return frozenset({FEATURE_TOOLS})

    @property
    def chat_template(self) -> str | None:
        source = self._config.get("chat_template") if self._config else None
        return source if isinstance(source, str) and source else None

    def check_grammar(self, grammar: str) -> None:
        raise ValueError(
            "the ONNX engine has no grammar-constrained sampling; serve a GGUF bundle for "
            "response_format json_object/json_schema, grammar or forced tool calls"
        )

    def prepare_chat(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
    ) -> Prompt:
        self._require()
        if self._template is None:
            raise not_for_chat(self.settings.name, self.settings.kind)
        try:
            text = self._template.render(
                messages=list(messages),
                tools=list(tools) if tools else None,
                bos_token=self._config.get("bos_token") or "",
                eos_token=self._config.get("eos_token") or "",
                add_generation_prompt=True,
            )
        except Exception as e:  # noqa: BLE001 - jinja raises many kinds; all mean bad input
            raise ValueError(f"the model's chat template rejected the messages: {e}") from e
        # As transformers' apply_chat_template: the template writes any BOS itself.
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return fitted(Prompt(tuple(ids)), self.n_ctx)

    def prepare_completion(self, text: str) -> Prompt:
        self._require()
        if self.settings.kind == "embedding":
            raise not_for_completion(self.settings.name)
        # tokenizer.json's post-processor adds BOS where the model wants one.
        ids = self._tokenizer.encode(text, add_special_tokens=True).ids
        return fitted(Prompt(tuple(ids)), self.n_ctx)

    # -- generation ------------------------------------------------------------------------

    def generate(
        self, prompt: Prompt, params: SamplingParams, cancel: CancelToken
    ) -> Iterator[TokenEvent | FinishEvent]:
        self._require()
        if self._decoder is None:
            raise ValueError(f"model {self.settings.name!r} does not generate text")
        n_prompt = len(prompt.tokens)
        limit = generation_limit(self.n_ctx, n_prompt, params.max_tokens)
        detok = Detokenizer(self._tokenizer)
        sampler = Sampler(
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=params.min_p,
            repeat_penalty=params.repeat_penalty,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            seed=params.seed,
        )
        eos = frozenset(int(i) for i in self._config.get("eos_token_ids") or [])
        tokens = generate_tokens(self._decoder, prompt.tokens, sampler, limit=limit, eos_ids=eos)
        yield from token_events(
            tokens,
            detok.add,
            detok.flush,
            n_prompt=n_prompt,
            limit=limit,
            stops=tuple(prompt.stop) + tuple(params.stop),
            cancel=cancel,
        )

    # -- embeddings ------------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        session = self._require()
        if self.settings.kind != "embedding":
            raise not_for_embeddings(self.settings.name, self.settings.kind)
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=True)
        ids_list = [list(e.ids) for e in encodings]
        n_tokens = sum(len(ids) for ids in ids_list)
        # Batch texts of similar length together: padding costs compute.
        order = sorted(range(len(ids_list)), key=lambda i: len(ids_list[i]))
        vectors: list[np.ndarray | None] = [None] * len(ids_list)
        for start in range(0, len(order), EMBED_BATCH):
            batch = order[start : start + EMBED_BATCH]
            pooled = self._embed_batch(session, [ids_list[i] for i in batch])
            for i, row in zip(batch, pooled, strict=True):
                vectors[i] = row
        return [v.tolist() for v in vectors if v is not None], n_tokens

    def _embed_batch(self, session: Any, batch: list[list[int]]) -> np.ndarray:
        width = max(len(ids) for ids in batch)
        pad = int(self._config.get("pad_token_id") or 0)
        ids = np.full((len(batch), width), pad, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        feeds = {k: v for k, v in feeds.items() if k in self._input_names}
        outputs = {o.name: v for o, v in zip(session.get_outputs(), session.run(None, feeds),
                                            strict=True)}
        if "sentence_embedding" in outputs:  # a sentence-transformers export pools in-graph
            return np.asarray(outputs["sentence_embedding"], dtype=np.float32)
        hidden = np.asarray(
            outputs.get("last_hidden_state", next(iter(outputs.values()))), dtype=np.float32
        )
        pooled = pool(hidden, mask, str(self._config.get("pooling", "mean")))
        if self._config.get("normalize"):
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            pooled = pooled / np.maximum(norms, 1e-12)
        return pooled

    def close(self) -> None:
        self._session = None
        self._decoder = None


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """Pool [batch, seq, dim] token states into [batch, dim] as sentence-transformers does."""
    m = mask[:, :, None].astype(np.float32)
    if mode == "cls":
        return hidden[:, 0, :]
    if mode == "max":
        return np.where(m > 0, hidden, -1e9).max(axis=1)
    summed = (hidden * m).sum(axis=1)
    counts = np.maximum(m.sum(axis=1), 1e-9)
    if mode == "mean":
        return summed / counts
    if mode == "mean_sqrt_len":
        return summed / np.sqrt(counts)
    raise ValueError(f"pooling {mode!r} is not one of cls, max, mean, mean_sqrt_len")


def _graph_bytes(model_path: Path) -> int:
    return sum(
        p.stat().st_size
        for p in model_path.parent.glob(model_path.name + "*")
        if p.is_file()
    )
