"""The chat engine: the one seam between a loaded model and every caller (web app, API, CLI)."""

from __future__ import annotations

import atexit
import gc
import logging
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from . import gpu
from .backends.batching import BatchDecoder
from .backends.decode_plan import DecodePlan, plan_decoding
from .backends.scheduler import ReplyScheduler
from .backends.token_stream import END, Empty, TokenStream
from .backends.worker import GenerationWorker
from .chat_types import (
    ContextTooLongError,
    EngineError,
    GenerationError,
    InvalidRequestError,
    Message,
    ReplyEvents,
    ReplyStats,
    history_to_messages,
    not_unicode,
)
from .convert import Progress
from .gpu_queue import GpuQueue
from .loader import ModelInfo, ModelLoadError, load_model
from .sampling import SamplingParams
from .settings import DEFAULT_SYSTEM_PROMPT, Settings
from .tokenizer import ChatTokenizer

log = logging.getLogger(__name__)

_CANCEL_POLL_SECONDS = 0.25  # how often a consumer waiting for a token checks its cancel event


@dataclass
class PreparedPrompt:
    """Prompt ids that fit the context budget, how many history messages were left out, the reply's token cap."""

    ids: list[int]
    dropped_messages: int
    max_new_tokens: int


class ChatEngine:
    """Streams replies from one model: one reply alone on the generation worker, concurrent ones in a batch.

    Admission (at most `plan.batch_slots` at once, the rest in line) and where each reply decodes are the
    scheduler's (`backends/scheduler.py`); this class prepares prompts, streams text and keeps the stats.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: ChatTokenizer,
        info: ModelInfo,
        settings: Settings,
        plan: DecodePlan | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.settings = settings
        pad = model.generation_config.pad_token_id
        self._pad_token_id = pad if pad is not None else tokenizer.stop_ids[0]
        self.scheduler = ReplyScheduler(
            model,
            plan=plan or plan_decoding(model, settings, info.context_window),
            stop_ids=list(tokenizer.stop_ids),
            pad_token_id=self._pad_token_id,
            context_window=info.context_window,
            queue_limit=settings.queue_limit,
            empty_cache_after_reply=settings.empty_cache_after_reply,
            generation_config=self.generation_config,
        )
        _close_at_exit(self)

    # What callers and tests read: the plan, the line, the worker, whether the static cache is on.
    @property
    def plan(self) -> DecodePlan:
        return self.scheduler.plan

    @property
    def queue(self) -> GpuQueue:
        return self.scheduler.queue

    @property
    def worker(self) -> GenerationWorker:
        return self.scheduler.worker

    @property
    def static_cache(self) -> bool:
        return self.scheduler.static_cache

    @static_cache.setter
    def static_cache(self, on: bool) -> None:
        self.scheduler.static_cache = on

    def batch_decoder(self) -> BatchDecoder | None:
        """The continuous batch, started on first use (`load` starts it while loading); None when off."""
        return self.scheduler.batch_decoder()

    @classmethod
    def load(cls, settings: Settings, progress: Progress | None = None) -> ChatEngine:
        model, tokenizer, info = load_model(settings, progress=progress)
        _freeze_long_lived_objects()
        engine = cls(model, tokenizer, info, settings)
        engine.warm_up()
        return engine

    def warm_up(self) -> None:
        """Reply once on each path, a few tokens, so that threads, compiles and caches are ready before the first chat.

        Raises ModelLoadError, saying which setting turns the failing part off.
        """
        hi: list[Message] = [{"role": "user", "content": "hi"}]
        params = SamplingParams.greedy_params(8)
        # A step the web app shows while loading: the log lines of the loading thread are its progress.
        log.info(
            "warming up the generation worker"
            + (" (compiling the decode step for the static cache)" if self.static_cache else "")
        )
        started = time.perf_counter()
        try:
            self._reply_on("worker", hi, params)
        except GenerationError as exc:
            if not (self.static_cache and self.settings.static_cache == "auto"):
                hint = (
                    "Start with INTERNLM_STATIC_CACHE=false, or check that torch.compile works here (Triton, from the "
                    "CUDA torch wheel, and a C compiler such as gcc)."
                    if self.static_cache
                    else "Check the model files and the GPU (python -m internlm_app doctor)."
                )
                raise ModelLoadError(f"the warm-up reply failed: {exc}. {hint}") from exc
            # Chosen by auto, not asked for: fall back to the dynamic cache and say why, rather than not start.
            log.warning("the compiled static cache failed its warm-up (%s); decoding on the dynamic cache", exc)
            self.scheduler.stop_static_cache(f"the compiled static cache failed its warm-up: {exc}")
            self.warm_up()
            return
        log.info("warm-up reply done in %.1fs", time.perf_counter() - started)
        if self.plan.batching:
            log.info("starting the continuous batch (%s)", self.plan.batch_reason)
            try:
                self._reply_on("batch", hi, params)
            except Exception as exc:
                # One reply at a time still works: go on without the batch and say why.
                log.warning("the continuous batch failed to start (%s); decoding one reply at a time", exc)
                self.scheduler.stop_batching(f"off: it failed to start ({exc}); INTERNLM_MAX_BATCH_SIZE=1 skips it")

    def close(self) -> None:
        """Stop the worker and the batch's threads; a reply still running ends at its next token. Idempotent.

        Runs at interpreter exit for every engine: a daemon thread that is inside torch's C++ code while the
        interpreter finalizes aborts the process ("terminate called without an active exception", exit code 134).
        """
        self.scheduler.close()

    def release_memory(self) -> tuple[list[gpu.DeviceMemory], list[gpu.DeviceMemory]]:
        """Drop the KV caches kept for reuse across turns and release cached CUDA blocks; GPU memory before, after.

        Replies that run keep their caches: only idle ones go (the next turn of those chats prefills again).
        """
        self.worker.forget_kv()
        return gpu.clear_cache()

    @property
    def context_window(self) -> int:
        return self.info.context_window

    def prepare(self, messages: list[Message], max_new_tokens: int, max_length: int | None = None) -> PreparedPrompt:
        """Validate messages and build prompt ids, leaving out the oldest turns that do not fit.

        `max_length` narrows the context budget for this request (never beyond the model's window). When no history
        is left to drop, the reply is capped to the room left; only a prompt that leaves no room at all is an error.
        """
        window = self.context_window if max_length is None else min(max_length, self.context_window)
        if not messages or messages[-1].get("role") != "user":
            raise InvalidRequestError("the conversation must end with a user message")
        _check_unicode(messages)
        system = messages[:1] if messages[0].get("role") == "system" else []
        history, new = list(messages[len(system) : -1]), messages[-1:]
        dropped = 0
        while True:
            ids = self.tokenizer.build_prompt_ids(system + history + new)
            needed = len(ids) + max_new_tokens
            if needed <= window:
                return PreparedPrompt(ids, dropped, max_new_tokens)
            if not history:
                if len(ids) < window:
                    return PreparedPrompt(ids, dropped, window - len(ids))
                raise ContextTooLongError(len(ids) + 1, window)
            cut, freed = 0, 0
            while cut < len(history) and freed < needed - window:
                freed += self.tokenizer.count_message_tokens(history[cut])
                cut += 1
            while cut < len(history) and history[cut]["role"] != "user":  # keep whole user/assistant turns
                cut += 1
            history, dropped = history[cut:], dropped + cut

    def stream_reply(
        self,
        messages: list[Message],
        params: SamplingParams,
        *,
        cancel: threading.Event | None = None,
        events: ReplyEvents | None = None,
        max_length: int | None = None,
    ) -> Iterator[str]:
        """Yield reply text as it is generated; `events.stats` holds the stats when the iterator ends.

        Bad input raises here, before anything runs. Setting `cancel`, or closing the iterator, stops generation
        within one token. A failed generation raises GenerationError from the iterator.
        """
        prepared = self.prepare(messages, params.max_new_tokens, max_length)
        if prepared.max_new_tokens != params.max_new_tokens:
            params = params.model_copy(update={"max_new_tokens": prepared.max_new_tokens})
        return self._stream(prepared, params, cancel, events or ReplyEvents())

    def _reply_on(self, path: str, messages: list[Message], params: SamplingParams) -> tuple[str, ReplyStats]:
        """A whole reply on one path ("worker" or "batch"), whatever else runs (the warm-up and tests use it)."""
        events = ReplyEvents()
        prepared = self.prepare(messages, params.max_new_tokens)
        text = "".join(self._stream(prepared, params, None, events, path=path))
        return text, events.stats

    def _stream(
        self,
        prepared: PreparedPrompt,
        params: SamplingParams,
        cancel: threading.Event | None,
        events: ReplyEvents,
        path: str | None = None,
    ) -> Iterator[str]:
        stats = events.stats
        stats.prompt_tokens, stats.dropped_messages = len(prepared.ids), prepared.dropped_messages
        queued = time.perf_counter()
        try:
            reply = self.scheduler.start(prepared.ids, params, cancel, events.on_queue, path)
        except BaseException as exc:
            stats.queue_seconds = time.perf_counter() - queued
            stats.finish_reason, stats.error = "error", _describe(exc)
            raise
        stats.queue_seconds = time.perf_counter() - queued
        if reply is None:  # cancelled while waiting
            stats.finish_reason = "cancelled"
            return
        started = time.perf_counter()
        stream, end, stop = reply.stream, reply.end, reply.stop
        decoder = self.tokenizer.stream_decoder()
        interval = self.settings.stream_interval_ms / 1000
        count, first_at, last_token, next_at, done = 0, None, None, 0.0, False
        try:
            while not done:
                if (wait := next_at - time.perf_counter()) > 0:
                    # Tokens that come meanwhile go out together (one wake-up, not one per token); the end of the
                    # reply, an error or a cancel ends the wait at once.
                    stream.finished.wait(wait)
                text, token = "", self._next_token(stream, cancel, end)
                while token is not END:
                    count, last_token = count + 1, token
                    if first_at is None:
                        first_at = time.perf_counter()
                        stats.time_to_first_token = first_at - started
                    text += decoder.push(token)
                    if not interval or stream.empty():  # interval 0: a chunk per token, even when some queued up
                        break
                    token = stream.get()
                done = token is END
                if done:
                    text += decoder.flush()
                if text:
                    next_at = time.perf_counter() + interval
                    yield text
        finally:
            stopped_here = not done  # the consumer went away (closed iterator) before the end: it stops generation
            stop.set()
            while not stream.finished.wait(_CANCEL_POLL_SECONDS):  # the worker lets go at its next token
                end()  # (again, should the reply have moved to the batch meanwhile)
            ended = time.perf_counter()
            stats.batched = reply.batched
            stats.completion_tokens, stats.total_seconds = count, ended - queued
            stats.cached_tokens = stream.cached_tokens
            if first_at is not None and count > 1 and ended > first_at:
                stats.tokens_per_second = (count - 1) / (ended - first_at)
            stats.finish_reason = self._finish_reason(last_token, count, params, stopped_here, cancel, stream.failure)
        if stream.failure is not None:
            stats.error = _describe(stream.failure)
            raise GenerationError(stats.error) from stream.failure

    @staticmethod
    def _next_token(stream: TokenStream, cancel: threading.Event | None, end) -> object:
        """The next token or END; a cancel set meanwhile stops the reply even when no token comes."""
        while True:
            try:
                return stream.get(timeout=_CANCEL_POLL_SECONDS)
            except Empty:
                if cancel is not None and cancel.is_set():
                    end()

    def _finish_reason(self, last_token, count, params, stopped_here: bool, cancel, failure) -> str:
        if failure is not None:
            return "error"
        if last_token in self.tokenizer.stop_ids:
            return "stop"
        if count >= params.max_new_tokens:
            return "length"
        if stopped_here or (cancel is not None and cancel.is_set()):
            return "cancelled"
        return "stop"

    def generation_config(self, params: SamplingParams) -> GenerationConfig:
        """transformers GenerationConfig for one reply on the worker; temperature 0 means greedy."""
        base = self.model.generation_config
        sampling = (
            {"do_sample": False}
            if params.greedy
            else {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
        )
        return GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            repetition_penalty=params.repetition_penalty,
            eos_token_id=list(self.tokenizer.stop_ids),
            pad_token_id=self._pad_token_id,
            bos_token_id=base.bos_token_id,
            **sampling,
        )

    def reply(self, messages: list[Message], params: SamplingParams) -> tuple[str, ReplyStats]:
        """The whole reply at once, with its stats."""
        events = ReplyEvents()
        text = "".join(self.stream_reply(messages, params, events=events))
        return text, events.stats

    # InternLM2-style calls for users coming from the tutorials (history as (user, assistant) pairs).
    def chat(
        self,
        query: str,
        history: list[tuple[str, str]] | None = None,
        *,
        system: str | None = DEFAULT_SYSTEM_PROMPT,
        params: SamplingParams | None = None,
    ) -> tuple[str, list[tuple[str, str]]]:
        params = params or self.settings.default_sampling()
        response, _ = self.reply(history_to_messages(query, history, system), params)
        return response, [*(history or []), (query, response)]

    def stream_chat(
        self,
        query: str,
        history: list[tuple[str, str]] | None = None,
        *,
        system: str | None = DEFAULT_SYSTEM_PROMPT,
        params: SamplingParams | None = None,
    ) -> Iterator[tuple[str, list[tuple[str, str]]]]:
        """Yield (response so far, history) once per streamed chunk: a token, or the tokens of one stream interval."""
        params = params or self.settings.default_sampling()
        response = ""
        for chunk in self.stream_reply(history_to_messages(query, history, system), params):
            response += chunk
            yield response, [*(history or []), (query, response)]


_ENGINES: weakref.WeakSet[ChatEngine] = weakref.WeakSet()


def _close_at_exit(engine: ChatEngine) -> None:
    if not _ENGINES:
        atexit.register(_close_engines)  # once per process (registering again is harmless: close is idempotent)
    _ENGINES.add(engine)


def _close_engines() -> None:
    for engine in list(_ENGINES):
        engine.close()


def _freeze_long_lived_objects() -> None:
    """Move what is alive once the model is loaded out of the cyclic garbage collector's sight.

    torch, transformers and the web or API stack leave some 300-400k tracked objects; a full collection scans them all
    while holding the GIL (0.2-0.3 s on this project's 2-core test VM), a stall in the middle of a streamed reply.
    Frozen, a collection scans only the objects made since. Frozen objects stay out of every collection until
    `gc.unfreeze()`: nothing unloads a model today; a feature that does must unfreeze first.
    """
    gc.collect()
    gc.freeze()


def _check_unicode(messages: list[Message]) -> None:
    """Refuse text the tokenizer cannot take; raises InvalidRequestError naming the message."""
    for index, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, str) and (why := not_unicode(content)):
            raise InvalidRequestError(f"message {index + 1} ({message.get('role')}) is not valid Unicode text: {why}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, EngineError):
        return str(exc)  # worded for people already (the batch's errors, a full queue, a closed engine)
    if isinstance(exc, torch.OutOfMemoryError):
        return f"GPU out of memory: {exc}. The cache was cleared; try fewer max new tokens or a shorter conversation."
    return f"{type(exc).__name__}: {exc}"
