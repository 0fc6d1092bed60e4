"""The OpenAI generation routes: chat completions, completions, embeddings.

Flow of one request: read the body (size-limited) → validate (400) → the model it names
(404 for any other, runtimes/models.py) →
readiness (503) → tokenize and check the context (400, off the engine thread) → admission
(429) → the engine worker streams events back → JSON or SSE. The engine worker, not this
coroutine, releases the admission ticket when the engine is really done, so a client that
vanishes never makes the server look free while the engine still works.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import anyio
from edgepack.runtimes.access_log import note_usage
from edgepack.runtimes.answers import (
    Answer,
    Constrained,
    chat_logprobs,
    check_features,
    completion_logprobs,
    constrain,
    stream_tool_calls,
)
from edgepack.runtimes.engine import (
    FINISH_CANCELLED,
    FINISH_STOP,
    CancelToken,
    FinishEvent,
    PromptTooLongError,
    SamplingParams,
    TokenEvent,
)
from edgepack.runtimes.lifecycle import DRAINING, LOADING, READY
from edgepack.runtimes.openai_schema import (
    ApiError,
    GenerationRequest,
    parse_chat,
    parse_completion,
    parse_embedding,
)
from edgepack.runtimes.worker import _post, stream_in_thread
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

if TYPE_CHECKING:
    from edgepack.runtimes.app import ServerState
    from edgepack.runtimes.models import ModelState
    from edgepack.runtimes.queue import Ticket

log = logging.getLogger("edgepack.serve")


def _state(request: Request) -> ServerState:
    return request.app.state.server  # type: ignore[no-any-return]


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON; 413 past ``limit`` bytes, 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(f"request body is {declared} bytes, the limit is {limit}",
                       status=413, code="request_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(f"request body exceeds the limit of {limit} bytes",
                               status=413, code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect as e:
        raise ApiError("client disconnected while sending the body", status=400) from e
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:
        # ValueError: not JSON, not UTF-8, or an integer past Python's 4,300-digit limit;
        # RecursionError: nesting deeper than the parser's stack. All are the client's: 400.
        raise ApiError(f"the request body is not valid JSON: {str(e)[:200]}",
                       code="invalid_json") from e


def _check_ready(s: ModelState) -> None:
    phase = s.lifecycle.phase
    if phase == READY:
        return
    if phase == LOADING:
        raise ApiError("the model is still loading; retry shortly (GET /readyz says when)",
                       status=503, type="server_error", code="loading",
                       headers={"Retry-After": "1"})
    if phase == DRAINING:
        s.metrics.rejected.labels("draining").inc()
        raise ApiError("the server is shutting down and accepts no new requests",
                       status=503, type="server_error", code="draining")
    raise ApiError(f"the engine failed and the server is not ready: {s.lifecycle.error}",
                   status=503, type="server_error", code="engine_failed")


async def _prepare(s: ModelState, fn: Callable[[], Constrained], param: str) -> Constrained:
    # Tokenizing reads only the vocabulary, so it runs beside a generation (llama-server
    # does the same on its HTTP threads); a long prompt never blocks the event loop.
    try:
        return await anyio.to_thread.run_sync(fn)
    except PromptTooLongError as e:
        raise ApiError(str(e), param=param, code="context_length_exceeded") from e
    except ValueError as e:
        raise ApiError(str(e), param=param, code="invalid_value") from e


def _engine_events(
    s: ModelState, job: Constrained, cancel: CancelToken,
    ticket: Ticket, loop: asyncio.AbstractEventLoop,
) -> Callable[[], Iterator[Any]]:
    """The job the worker runs: marks the ticket, records metrics, releases the ticket."""
    m = s.metrics

    def make() -> Iterator[Any]:
        _post(loop, ticket.start)
        try:
            for ev in _guarded(s, loop, s.engine.generate(job.prompt, job.params, cancel)):
                if isinstance(ev, FinishEvent):
                    reason = ev.reason
                    if reason == FINISH_CANCELLED and cancel.reason:
                        reason = cancel.reason  # client_disconnected, timeout, shutdown
                    m.generations.labels(reason).inc()
                    m.tokens_in.inc(ev.prompt_tokens)
                    m.tokens_out.inc(ev.completion_tokens)
                    decode_s = ev.timings.get("decode_s", 0.0)
                    if ev.completion_tokens > 1 and decode_s > 0:
                        m.decode_rate.set((ev.completion_tokens - 1) / decode_s)
                yield ev
        finally:
            _post(loop, ticket.release)

    return make


def _guarded(s: ModelState, loop: asyncio.AbstractEventLoop, it: Iterator[Any]) -> Iterator[Any]:
    # An exception inside the engine is not a bad request: the engine may be in any state,
    # so readiness turns 503 and the watchdog stops (systemd restarts the unit).
    try:
        yield from it
    except Exception as e:
        _post(loop, s.lifecycle.mark_broken, e)
        raise


class _CancellingStream(StreamingResponse):
    """An SSE response that cancels its generation however the response ends.

    Starlette cancels the body iterator when the client disconnects; if that happens before
    the iterator ever started, its ``finally`` never runs, so the cancel lives here.
    """

    def __init__(self, content: AsyncIterator[bytes], cancel: CancelToken) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._cancel = cancel

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # No-op when the generation already finished.
            self._cancel.cancel("client_disconnected")


async def _watch_disconnect(request: Request, cancel: CancelToken) -> None:
    # After the body is read, the next ASGI message is http.disconnect when the client goes.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.cancel("client_disconnected")
            return


def _public_reason(reason: str) -> str:
    return FINISH_STOP if reason == FINISH_CANCELLED else reason


async def _generate(request: Request, chat: bool) -> Response:
    server = _state(request)
    t0 = time.perf_counter()
    body = await read_json(request, server.config.max_body_bytes)
    req = parse_chat(body) if chat else parse_completion(body)
    s = server.models.route(req.model)
    _check_ready(s)
    engine = s.engine
    check_features(engine, req)
    job = await _prepare(s, lambda: constrain(engine, req, chat),
                         "messages" if chat else "prompt")
    _check_ready(s)
    ticket = s.admission.enter()
    cancel = CancelToken()
    loop = asyncio.get_running_loop()
    try:
        # An engine with several slots decodes on its own thread; each request waits for its
        # tokens on a thread of its own instead of queueing behind the others on the worker.
        run = stream_in_thread if getattr(engine, "slots", 1) > 1 else s.worker.stream
        events = run(_engine_events(s, job, cancel, ticket, loop))
    except BaseException:
        ticket.release()
        raise
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    answer = Answer(job.tool_format, req.tool_forced, job.params.logprobs is not None)
    if req.stream:
        return _CancellingStream(
            _sse(s, req, chat, events, cancel, ident, created, t0, answer), cancel)
    return await _complete(s, request, chat, events, cancel, ident, created, t0, answer,
                           job.params)


async def _complete(
    s: ModelState, request: Request, chat: bool, events: AsyncIterator[Any],
    cancel: CancelToken, ident: str, created: int, t0: float, answer: Answer,
    params: SamplingParams,
) -> Response:
    s_active = s.active
    s_active.add(cancel)
    watcher = asyncio.create_task(_watch_disconnect(request, cancel))
    first = True
    finish: FinishEvent | None = None
    try:
        with anyio.move_on_after(s.config.request_timeout_seconds) as scope:
            async for ev in events:
                if isinstance(ev, TokenEvent):
                    if first:
                        s.metrics.ttft.observe(time.perf_counter() - t0)
                        first = False
                    answer.feed(ev.text, ev.logprobs)
                else:
                    finish = ev
                    note_usage(ev.prompt_tokens, ev.completion_tokens)
    finally:
        watcher.cancel()
        s_active.discard(cancel)
        if finish is None:
            cancel.cancel("timeout" if not cancel.cancelled else cancel.reason)
    if scope.cancelled_caught or finish is None:
        raise ApiError(
            f"the request took longer than request_timeout_seconds "
            f"({s.config.request_timeout_seconds:g} s); ask for fewer max_tokens",
            status=504, type="server_error", code="timeout",
        )
    if finish.reason == FINISH_CANCELLED and cancel.reason == "shutdown":
        # The drain deadline passed while this answer was still being generated: say so
        # rather than hand back a truncated answer as if it were complete.
        raise ApiError(
            "the server is shutting down and stopped this generation at its drain deadline; "
            "retry the request",
            status=503, type="server_error", code="shutting_down",
            headers={"Retry-After": "1"},
        )
    answer.finish()
    usage = {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
             "total_tokens": finish.prompt_tokens + finish.completion_tokens}
    reason = answer.finish_reason(_public_reason(finish.reason))
    logprobs: dict[str, Any] | None = None
    if params.logprobs is not None:
        items = answer.take_logprobs()
        logprobs = chat_logprobs(items) if chat else completion_logprobs(items, 0)
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": answer.message(),
                                  "logprobs": logprobs, "finish_reason": reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": answer.content, "logprobs": logprobs,
                  "finish_reason": reason}
        obj = "text_completion"
    return JSONResponse({"id": ident, "object": obj, "created": created,
                         "model": s.config.model_name, "choices": [choice], "usage": usage})


def _sse_data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _sse(
    s: ModelState, req: GenerationRequest, chat: bool, events: AsyncIterator[Any],
    cancel: CancelToken, ident: str, created: int, t0: float, answer: Answer,
) -> AsyncIterator[bytes]:
    """OpenAI's chunk stream. Leaving early (client gone) cancels the engine at once."""
    model = s.config.model_name
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta_or_text: Any, reason: str | None) -> dict[str, Any]:
        logprobs: dict[str, Any] | None = None
        if answer.want_logprobs:
            items = answer.take_logprobs()
            if items:
                logprobs = (chat_logprobs(items) if chat else
                            completion_logprobs(items, answer.completion_offset(items)))
        if chat:
            c: dict[str, Any] = {"index": 0, "delta": delta_or_text, "logprobs": logprobs,
                                 "finish_reason": reason}
        else:
            c = {"index": 0, "text": delta_or_text, "logprobs": logprobs,
                 "finish_reason": reason}
        return {"id": ident, "object": obj, "created": created, "model": model, "choices": [c]}

    s.active.add(cancel)
    first = True
    finished = False
    try:
        if chat:
            yield _sse_data(chunk({"role": "assistant", "content": ""}, None))
        with anyio.move_on_after(s.config.request_timeout_seconds):
            async for ev in events:
                if isinstance(ev, TokenEvent):
                    if first:
                        s.metrics.ttft.observe(time.perf_counter() - t0)
                        first = False
                    out = answer.feed(ev.text, ev.logprobs)
                    if out:
                        yield _sse_data(chunk({"content": out} if chat else out, None))
                    continue
                finished = True
                note_usage(ev.prompt_tokens, ev.completion_tokens)
                if ev.reason == FINISH_CANCELLED and cancel.reason == "shutdown":
                    # Cut at the drain deadline: an error event, as llama-server and OpenAI
                    # send mid-stream (the openai client raises APIError on a data event with
                    # an "error" key, openai/_streaming.py), and no [DONE]: finish_reason
                    # "stop" + [DONE] would read as a complete answer (issue #13).
                    yield _sse_data(ApiError(
                        "the server is shutting down and stopped this generation at its drain "
                        "deadline; the answer is incomplete, retry the request",
                        status=503, type="server_error", code="shutting_down").body())
                    return
                tail = answer.finish()
                if tail:
                    yield _sse_data(chunk({"content": tail} if chat else tail, None))
                if answer.calls:
                    yield _sse_data(chunk({"tool_calls": stream_tool_calls(answer.calls)}, None))
                reason = answer.finish_reason(_public_reason(ev.reason))
                yield _sse_data(chunk({} if chat else "", reason))
                if req.include_usage:
                    yield _sse_data({
                        "id": ident, "object": obj, "created": created, "model": model,
                        "choices": [],
                        "usage": {"prompt_tokens": ev.prompt_tokens,
                                  "completion_tokens": ev.completion_tokens,
                                  "total_tokens": ev.prompt_tokens + ev.completion_tokens},
                    })
        if not finished:
            cancel.cancel("timeout")
            err = ApiError(f"the request took longer than request_timeout_seconds "
                           f"({s.config.request_timeout_seconds:g} s)",
                           status=504, type="server_error", code="timeout")
            yield _sse_data(err.body())
        yield b"data: [DONE]\n\n"
    finally:
        s.active.discard(cancel)
        if not finished:
            # The client went away (task cancelled / send failed): stop the engine now.
            cancel.cancel(cancel.reason or "client_disconnected")


async def chat_completions(request: Request) -> Response:
    return await _generate(request, chat=True)


async def completions(request: Request) -> Response:
    return await _generate(request, chat=False)


async def embeddings(request: Request) -> Response:
    server = _state(request)
    body = await read_json(request, server.config.max_body_bytes)
    req = parse_embedding(body)
    s = server.models.route(req.model)
    if s.config.model_kind != "embedding":
        raise ApiError(f"model {req.model!r} is a {s.config.model_kind} model, not an "
                       "embedding model; use /v1/chat/completions or /v1/completions",
                       param="model", code="wrong_model_kind")
    _check_ready(s)
    engine = s.engine
    n_ctx = engine.n_ctx
    counts = await anyio.to_thread.run_sync(lambda: [engine.count_tokens(t) for t in req.inputs])
    for i, n in enumerate(counts):
        # +2: BERT-style models add [CLS] and [SEP] around the text.
        if n + 2 > n_ctx:
            raise ApiError(f"input[{i}] is {n + 2} tokens but the model's context is {n_ctx} "
                           "tokens; split or shorten it", param=f"input[{i}]",
                           code="context_length_exceeded")
    ticket = s.admission.enter()
    loop = asyncio.get_running_loop()

    def job() -> tuple[list[list[float]], int]:
        _post(loop, ticket.start)
        try:
            return engine.embed(req.inputs)
        finally:
            _post(loop, ticket.release)

    try:
        vectors, n_tokens = await s.worker.submit(job)
    except ValueError as e:
        raise ApiError(str(e), param="input", code="invalid_value") from e
    s.metrics.tokens_in.inc(n_tokens)
    note_usage(n_tokens)
    data = []
    for i, v in enumerate(vectors):
        emb: Any = (base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
                    if req.encoding_format == "base64" else v)
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return JSONResponse({"object": "list", "data": data, "model": s.config.model_name,
                         "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})
