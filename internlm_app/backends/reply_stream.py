"""One reply's consumer side: its token ids, as the worker or the batch puts them, turned into text chunks and stats.

The engine starts a reply (`scheduler.ReplyScheduler.start`) and hands it here. Text is decoded incrementally (a
character split over several byte tokens waits for the rest), stop ids end the reply and never show, tool tokens become
control chunks, and tokens that arrive within one stream interval go out as one chunk (one wake-up per interval, not
per token). Closing the iterator stops generation within one token.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from internlm_app.backends.sampler import TokenSampler
from internlm_app.backends.scheduler import Reply as RunningReply
from internlm_app.backends.token_stream import END, Empty, TokenStream
from internlm_app.chat_types import EngineError, FinishReason, GenerationError, Reply, ReplyChunk, ReplyStats
from internlm_app.runtime.stop_strings import StopFilter
from internlm_app.runtime.tokenizer import ChatTokenizer
from internlm_app.sampling import SamplingParams

CANCEL_POLL_SECONDS = 0.25  # how often a consumer waiting for a token checks its cancel event


@dataclass
class ReplyPlan:
    """How one reply decodes: the ids that end it, the tool tokens it carries as control chunks, its sampler."""

    stop_ids: list[int]
    controls: dict[int, str]
    sampler: TokenSampler | None = None
    stop_strings: list[str] | None = None  # the reply ends at the token whose text completes one (vLLM's `stop`)


def reply_chunks(
    reply: RunningReply,
    tokenizer: ChatTokenizer,
    plan: ReplyPlan,
    params: SamplingParams,
    stats: ReplyStats,
    *,
    cancel: threading.Event | None,
    queued: float,
    interval: float,
) -> Iterator[ReplyChunk]:
    """Yield the reply's chunks until its stream ends; fill `stats` (tokens, TTFT, tokens/s, finish reason) then.

    `queued` is the `time.perf_counter()` at which the caller asked for the reply (the start of `total_seconds`);
    `interval` is seconds between chunks (0: one chunk per token). Raises GenerationError when decoding failed.
    """
    started = time.perf_counter()
    stream, end, stop = reply.stream, reply.end, reply.stop
    decoder = tokenizer.stream_decoder()
    stops, controls, sampler = frozenset(plan.stop_ids), plan.controls, plan.sampler
    records = sampler is not None and sampler.logprobs is not None
    piece = ReplyChunk(logprobs=[] if records else None)  # text (and ids) not sent yet
    count, first_at, last_token, next_at, done = 0, None, None, 0.0, False
    # Stop strings end generation at the token that completes one: the count stops there, whatever the reader does
    # (the text itself is cut by the reader, which holds back what may start one).
    stop_text = StopFilter(plan.stop_strings) if plan.stop_strings else None
    try:
        while not done:
            if (wait := next_at - time.perf_counter()) > 0:
                # Tokens that come meanwhile go out together (one wake-up, not one per token); the end of the
                # reply, an error or a cancel ends the wait at once.
                stream.finished.wait(wait)
            out: list[ReplyChunk] = []
            token = _next_token(stream, cancel, end)
            while token is not END:
                count, last_token = count + 1, token
                if first_at is None:
                    first_at = time.perf_counter()
                    stats.time_to_first_token = first_at - started
                record = sampler.pop_record() if records and sampler is not None else None
                if token in controls:  # a tool token: its own chunk, between the text before and after it
                    if piece.token_ids:
                        out.append(piece)
                        piece = ReplyChunk(logprobs=[] if records else None)
                    out.append(ReplyChunk(token_ids=[token], control=controls[token]))
                elif token not in stops:
                    text = decoder.push(token)
                    piece.text += text
                    piece.token_ids.append(token)
                    if record is not None and piece.logprobs is not None:
                        piece.logprobs.append(record)
                    if stop_text is not None:
                        stop_text.push(text)
                        if stop_text.hit:
                            break
                if not interval or stream.empty():  # interval 0: a chunk per token, even when some queued up
                    break
                token = stream.get()
            done = token is END or (stop_text is not None and stop_text.hit)
            if done:
                piece.text += decoder.flush()
            if piece.text or (done and piece.token_ids):  # ids of half a character wait for the rest
                out.append(piece)
                piece = ReplyChunk(logprobs=[] if records else None)
            if out:
                next_at = time.perf_counter() + interval
                yield from out
    finally:
        stopped_here = not done  # the consumer went away (closed iterator) before the end: it stops generation
        stop.set()
        while not stream.finished.wait(CANCEL_POLL_SECONDS):  # the worker lets go at its next token
            end()  # (again, should the reply have moved to the batch meanwhile)
        ended = time.perf_counter()
        stats.batched = reply.batched
        stats.completion_tokens, stats.total_seconds = count, ended - queued
        stats.cached_tokens = stream.cached_tokens
        if first_at is not None and count > 1 and ended > first_at:
            stats.tokens_per_second = (count - 1) / (ended - first_at)
        by_stop = last_token in stops or (stop_text is not None and stop_text.hit)
        stats.finish_reason = _finish_reason(by_stop, count, params, stopped_here, cancel, stream.failure)
    if stream.failure is not None:
        stats.error = describe_failure(stream.failure)
        raise GenerationError(stats.error) from stream.failure


def _next_token(stream: TokenStream, cancel: threading.Event | None, end) -> Any:  # a token id (int) or END
    """The next token or END; a cancel set meanwhile stops the reply even when no token comes."""
    while True:
        try:
            return stream.get(timeout=CANCEL_POLL_SECONDS)
        except Empty:
            if cancel is not None and cancel.is_set():
                end()


def _finish_reason(
    stopped_by_token: bool,
    count: int,
    params: SamplingParams,
    stopped_here: bool,
    cancel: threading.Event | None,
    failure: BaseException | None,
) -> FinishReason:
    if failure is not None:
        return "error"
    if stopped_by_token:
        return "stop"
    if count >= params.max_new_tokens:
        return "length"
    if stopped_here or (cancel is not None and cancel.is_set()):
        return "cancelled"
    return "stop"


def describe_failure(exc: BaseException) -> str:
    """One line for a failed reply's stats and error: the engine's own errors as worded, others with their type."""
    if isinstance(exc, EngineError):
        return str(exc)  # worded for people already (the batch's errors, a full queue, a closed engine)
    if isinstance(exc, torch.OutOfMemoryError):
        return f"GPU out of memory: {exc}. The cache was cleared; try fewer max new tokens or a shorter conversation."
    return f"{type(exc).__name__}: {exc}"


def texts_of(chunks: Reply[ReplyChunk]) -> Reply[str]:
    """The chunks' text; closing this closes them (which stops generation)."""
    with contextlib.closing(chunks):
        for chunk in chunks:
            if chunk.text:
                yield chunk.text
