"""The loop every engine shares: token ids in, text events and one finish event out.

An engine supplies the token ids (its own sampler and KV cache), a function from a token id to
text (holding back incomplete UTF-8) and a final flush; this loop applies stop sequences,
max_tokens, cancellation and end-of-generation tokens the same way for every engine, and
measures prefill and decode time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence

from edgepack.runtimes.engine import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    CancelToken,
    FinishEvent,
    TokenEvent,
    TokenLogprob,
)
from edgepack.runtimes.stops import StopScanner


def token_events(
    tokens: Generator[int, None, None],
    to_text: Callable[[int], str],
    flush_text: Callable[[], str],
    *,
    n_prompt: int,
    limit: int,
    stops: Sequence[str],
    cancel: CancelToken,
    is_end: Callable[[int], bool] = lambda _t: False,
    describe: Callable[[int], TokenLogprob] | None = None,
) -> Generator[TokenEvent | FinishEvent, None, None]:
    """Turn ``tokens`` into events; ``tokens`` is closed however the loop ends.

    A token stream that ends by itself before ``limit`` means end of generation (stop).
    ``describe`` (for logprobs) is called for each generated token before ``tokens`` is
    advanced, while the engine still holds the logits that produced it.
    """
    scanner = StopScanner(stops)
    t0 = time.perf_counter()
    t_first = 0.0
    n_out = 0
    if cancel.cancelled:
        tokens.close()
        yield FinishEvent(FINISH_CANCELLED, n_prompt, 0)
        return
    reason = FINISH_STOP
    pending: list[TokenLogprob] = []  # logprobs of tokens whose text is still held back
    try:
        if limit <= 0:
            reason = FINISH_LENGTH
        else:
            for token in tokens:
                if not t_first:
                    t_first = time.perf_counter()
                if cancel.cancelled:
                    reason = FINISH_CANCELLED
                    break
                if is_end(token):
                    reason = FINISH_STOP
                    break
                n_out += 1
                if describe is not None:
                    pending.append(describe(token))
                out = scanner.feed(to_text(token))
                if out:
                    yield TokenEvent(out, tuple(pending))
                    pending.clear()
                if scanner.stopped:
                    reason = FINISH_STOP
                    break
                if n_out >= limit:
                    reason = FINISH_LENGTH
                    break
    finally:
        tokens.close()
    if reason != FINISH_CANCELLED and not scanner.stopped:
        tail = scanner.feed(flush_text())
        tail += "" if scanner.stopped else scanner.flush()
        if tail:
            yield TokenEvent(tail, tuple(pending))
    t_end = time.perf_counter()
    t_first = t_first or t_end
    yield FinishEvent(
        reason, n_prompt, n_out, {"prefill_s": t_first - t0, "decode_s": t_end - t_first}
    )
