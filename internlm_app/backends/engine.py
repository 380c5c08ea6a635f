"""The chat engine: the one seam between a loaded model and every caller (web app, API, CLI)."""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from internlm_app.backends.batching import BatchDecoder
from internlm_app.backends.decode_plan import DecodePlan, plan_decoding
from internlm_app.backends.gpu_queue import GpuQueue
from internlm_app.backends.sampler import TokenSampler
from internlm_app.backends.scheduler import ReplyScheduler
from internlm_app.backends.token_stream import END, Empty, TokenStream
from internlm_app.backends.worker import GenerationWorker
from internlm_app.chat_types import (
    ContextTooLongError,
    DecodingState,
    EngineError,
    GenerationError,
    InvalidRequestError,
    Message,
    ModelInfo,
    Reply,
    ReplyChunk,
    ReplyEvents,
    ReplyOptions,
    ReplyStats,
    history_to_messages,
    not_unicode,
)
from internlm_app.load_progress import LoadStep, Progress
from internlm_app.runtime import gpu
from internlm_app.runtime.grammar import GrammarCompiler
from internlm_app.runtime.loader import ModelLoadError, load_model
from internlm_app.runtime.tokenizer import ChatTokenizer
from internlm_app.sampling import SamplingParams
from internlm_app.settings import DEFAULT_SYSTEM_PROMPT, ModelSettings

log = logging.getLogger(__name__)

_CANCEL_POLL_SECONDS = 0.25  # how often a consumer waiting for a token checks its cancel event


NO_OPTIONS = ReplyOptions()


@dataclass
class PreparedPrompt:
    """Prompt ids that fit the context budget, how many history messages were left out, the reply's token cap."""

    ids: list[int]
    dropped_messages: int
    max_new_tokens: int


@dataclass
class _ReplyPlan:
    """How one reply decodes: the ids that end it, the tool tokens it carries as control chunks, its sampler."""

    stop_ids: list[int]
    controls: dict[int, str]
    sampler: TokenSampler | None = None


class ChatEngine:
    """Streams replies from one model: one reply alone on the generation worker, concurrent ones in a batch.

    Admission (at most `plan.batch_slots` at once, the rest in line) and where each reply decodes are the
    scheduler's (`backends/scheduler.py`); this class prepares prompts, streams text and keeps the stats.
    """

    local = True  # the model runs here

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: ChatTokenizer,
        info: ModelInfo,
        settings: ModelSettings,
        plan: DecodePlan | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.settings = settings = settings.model  # the model part of a Settings only
        pad = model.generation_config.pad_token_id
        self._pad_token_id = pad if pad is not None else tokenizer.stop_ids[0]
        self._stop_ids = reply_stop_ids(tokenizer)
        self._tool_stop_ids = reply_stop_ids(tokenizer, tools=True)
        self._grammars = GrammarCompiler(tokenizer, int(model.config.vocab_size))
        self.scheduler = ReplyScheduler(
            model,
            plan=plan or plan_decoding(model, settings, info.context_window),
            stop_ids=list(self._stop_ids),
            pad_token_id=self._pad_token_id,
            context_window=info.context_window,
            queue_limit=settings.queue_limit,
            empty_cache_after_reply=settings.empty_cache_after_reply,
            generation_config=self.generation_config,
        )
        _close_at_exit(self)

    # What callers and tests read: the plan, the line, the worker, whether the static cache is on, the stop ids.
    @property
    def stop_ids(self) -> list[int]:
        """The ids that end a reply when no tools are offered (see `reply_stop_ids`)."""
        return list(self._stop_ids)

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
    def load(cls, settings: ModelSettings, progress: Progress | None = None) -> ChatEngine:
        settings = settings.model
        model, tokenizer, info = load_model(settings, progress=progress)
        _freeze_long_lived_objects()
        engine = cls(model, tokenizer, info, settings)
        engine.warm_up(progress)
        return engine

    def warm_up(self, progress: Progress | None = None) -> None:
        """Reply once on each path, a few tokens, so that threads, compiles and caches are ready before the first chat.

        Raises ModelLoadError, saying which setting turns the failing part off.
        """
        hi: list[Message] = [{"role": "user", "content": "hi"}]
        params = SamplingParams.greedy_params(8)
        compiling = "compiling the decode step for the static cache" if self.static_cache else ""
        if progress:  # the load's progress logs it
            progress(LoadStep("warmup", detail=compiling))
        else:
            log.info("warming up the generation worker" + (f" ({compiling})" if compiling else ""))
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
                raise ModelLoadError(f"the warm-up reply failed: {exc}. {hint}", "warmup_failed") from exc
            # Chosen by auto, not asked for: fall back to the dynamic cache and say why, rather than not start.
            log.warning("the compiled static cache failed its warm-up (%s); decoding on the dynamic cache", exc)
            self.scheduler.stop_static_cache(f"the compiled static cache failed its warm-up: {exc}")
            self.warm_up(progress)
            return
        log.info("warm-up reply done in %.1fs", time.perf_counter() - started)
        if self.plan.batching:
            if progress:
                progress(LoadStep("batch", detail=self.plan.batch_reason))
            else:
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

    def decoding(self) -> DecodingState:
        """The decode plan chosen at load (with its reasons) and the KV cache kept across turns now."""
        return DecodingState(**self.plan.to_dict(), kept_tokens=self.worker.kept_tokens)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` alone, with the model's tokenizer (no special tokens)."""
        return len(self.tokenizer.encode_plain(text))

    def prompt_tokens(self, messages: list[Message]) -> int:
        """Tokens of the whole prompt `messages` make (InternLM2's chat format, the open assistant turn included)."""
        return len(self.tokenizer.build_prompt_ids(messages))

    def prepare(
        self,
        messages: list[Message],
        max_new_tokens: int,
        max_length: int | None = None,
        options: ReplyOptions = NO_OPTIONS,
    ) -> PreparedPrompt:
        """Validate messages and build prompt ids that fit the context budget.

        The leading system messages are always kept. By default (the web app) the oldest turns are left out while
        prompt + `max_new_tokens` exceeds the budget; with `options.keep_history` (the API) turns are left out only
        when the prompt itself does not fit (then enough for min(max_new_tokens, a quarter of the budget) of reply),
        and otherwise the reply is capped to the room left. With no history left to drop, the reply is capped too;
        only a prompt that leaves no room at all is an error (ContextTooLongError).
        `max_length` narrows the budget for this request (never beyond the model's window).
        """
        window = self.context_window if max_length is None else min(max_length, self.context_window)
        _check_unicode(messages)
        if options.raw_prompt:
            ids = self.tokenizer.encode(messages[0]["content"] if messages else "")
            if len(ids) >= window:
                raise ContextTooLongError(len(ids) + 1, window)
            return PreparedPrompt(ids, 0, min(max_new_tokens, window - len(ids)))
        if not messages or messages[-1].get("role") not in ("user", "environment", "assistant"):
            raise InvalidRequestError("the conversation must end with a user message, a tool result or a prefill")
        continue_final = messages[-1]["role"] == "assistant"
        if continue_final and messages[-1].get("tool_calls"):
            raise InvalidRequestError("the last message has tool calls: send their results before asking again")
        lead = 0
        while lead < len(messages) - 1 and messages[lead].get("role") == "system":
            lead += 1
        users = [i for i in range(lead, len(messages)) if messages[i].get("role") == "user"]
        start = users[-1] if users else len(messages) - 1  # the newest user message and what answers it so far
        system, history, new = messages[:lead], list(messages[lead:start]), messages[start:]
        suffix = self._tool_call_prefix() if options.force_tool_call else []
        dropped, room_wanted = 0, max_new_tokens
        while True:
            ids = self.tokenizer.build_prompt_ids(system + history + new, continue_final=continue_final) + suffix
            room = window - len(ids)
            if room >= room_wanted:
                return PreparedPrompt(ids, dropped, min(max_new_tokens, room))
            if room > 0 and ((options.keep_history and not dropped) or not history):
                return PreparedPrompt(ids, dropped, room)
            if not history:
                raise ContextTooLongError(len(ids) + 1, window)
            if options.keep_history:  # the prompt does not fit: once turns go, leave a useful reply room too
                room_wanted = min(max_new_tokens, window // 4)
            excess = len(ids) + room_wanted - window
            cut, freed = 0, 0
            while cut < len(history) and freed < excess:
                freed += self.tokenizer.count_message_tokens(history[cut])
                cut += 1
            while cut < len(history) and history[cut]["role"] != "user":  # keep whole user/assistant turns
                cut += 1
            history, dropped = history[cut:], dropped + cut

    def _tool_call_prefix(self) -> list[int]:
        tools = self.tokenizer.tool_ids
        if not {"<|action_start|>", "<|plugin|>"} <= tools.keys():
            raise InvalidRequestError("this model's vocabulary has no tool tokens: it cannot call tools")
        return [tools["<|action_start|>"], tools["<|plugin|>"], *self.tokenizer.encode_plain("\n")]

    def stream_reply(
        self,
        messages: list[Message],
        params: SamplingParams,
        *,
        cancel: threading.Event | None = None,
        events: ReplyEvents | None = None,
        max_length: int | None = None,
    ) -> Reply[str]:
        """Yield reply text as it is generated; `events.stats` holds the stats when the iterator ends.

        Bad input raises here, before anything runs. Setting `cancel`, or closing the iterator, stops generation
        within one token. A failed generation raises GenerationError from the iterator.
        """
        chunks = self.stream_chunks(messages, params, cancel=cancel, events=events, max_length=max_length)
        return _texts(chunks)

    def stream_chunks(
        self,
        messages: list[Message],
        params: SamplingParams,
        options: ReplyOptions = NO_OPTIONS,
        *,
        cancel: threading.Event | None = None,
        events: ReplyEvents | None = None,
        max_length: int | None = None,
    ) -> Reply[ReplyChunk]:
        """Like `stream_reply`, as ReplyChunks: text with its token ids, logprobs when asked for, and (with tools)
        the tool tokens as control chunks. Raises InvalidRequestError here for options the model cannot honour."""
        prepared = self.prepare(messages, params.max_new_tokens, max_length, options)
        if prepared.max_new_tokens != params.max_new_tokens:
            params = params.model_copy(update={"max_new_tokens": prepared.max_new_tokens})
        plan = self._reply_plan(params, options)
        return self._stream(prepared, params, cancel, events or ReplyEvents(), plan=plan)

    def _reply_plan(self, params: SamplingParams, options: ReplyOptions) -> _ReplyPlan:
        tools = options.tools or options.force_tool_call
        if tools and "<|action_end|>" not in self.tokenizer.tool_ids:
            raise InvalidRequestError("tools: this model's vocabulary has no tool tokens, so it cannot call tools")
        stop_ids = self._tool_stop_ids if tools else self._stop_ids
        controls = {i: name for name, i in self.tokenizer.tool_ids.items()} if tools else {}
        if not options.needs_sampler:
            return _ReplyPlan(stop_ids, controls)
        compiled = None
        if options.json_schema is not None:
            param = "tool_choice" if options.force_tool_call else "response_format"
            ends = [self.tokenizer.tool_ids["<|action_end|>"]] if options.force_tool_call else self.tokenizer.stop_ids
            compiled = self._grammars.compile(options.json_schema, list(ends), param)
        sampler = TokenSampler(
            params,
            seed=options.seed,
            logprobs=options.logprobs,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            compiled_grammar=compiled,
            describe=self.describe_token,
        )
        return _ReplyPlan(stop_ids, controls, sampler)

    def describe_token(self, token_id: int) -> tuple[str, bytes]:
        """One id's text and UTF-8 bytes, as logprobs show it (a special token by its name, with no bytes)."""
        token_bytes = getattr(self.tokenizer, "token_bytes", None)
        data = token_bytes(token_id) if token_bytes else self.tokenizer.decode([token_id]).encode()
        if data:
            return data.decode("utf-8", errors="replace"), data
        return self.tokenizer.decode([token_id], skip_special_tokens=False).strip(), b""

    def _reply_on(self, path: str, messages: list[Message], params: SamplingParams) -> tuple[str, ReplyStats]:
        """A whole reply on one path ("worker" or "batch"), whatever else runs (the warm-up and tests use it)."""
        events = ReplyEvents()
        prepared = self.prepare(messages, params.max_new_tokens)
        chunks = self._stream(prepared, params, None, events, plan=self._reply_plan(params, NO_OPTIONS), path=path)
        return "".join(chunk.text for chunk in chunks), events.stats

    def _stream(
        self,
        prepared: PreparedPrompt,
        params: SamplingParams,
        cancel: threading.Event | None,
        events: ReplyEvents,
        *,
        plan: _ReplyPlan,
        path: str | None = None,
    ) -> Reply[ReplyChunk]:
        stats = events.stats
        stats.prompt_tokens, stats.dropped_messages = len(prepared.ids), prepared.dropped_messages
        queued = time.perf_counter()
        own_stops = None if plan.stop_ids == self._stop_ids else plan.stop_ids
        try:
            reply = self.scheduler.start(
                prepared.ids, params, cancel, events.on_queue, path, logits_processor=plan.sampler, stop_ids=own_stops
            )
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
        stops, controls, sampler = frozenset(plan.stop_ids), plan.controls, plan.sampler
        records = sampler is not None and sampler.logprobs is not None
        piece = ReplyChunk(logprobs=[] if records else None)  # text (and ids) not sent yet
        count, first_at, last_token, next_at, done = 0, None, None, 0.0, False
        try:
            while not done:
                if (wait := next_at - time.perf_counter()) > 0:
                    # Tokens that come meanwhile go out together (one wake-up, not one per token); the end of the
                    # reply, an error or a cancel ends the wait at once.
                    stream.finished.wait(wait)
                out: list[ReplyChunk] = []
                token = self._next_token(stream, cancel, end)
                while token is not END:
                    count, last_token = count + 1, token
                    if first_at is None:
                        first_at = time.perf_counter()
                        stats.time_to_first_token = first_at - started
                    record = sampler.pop_record() if records else None
                    if token in controls:  # a tool token: its own chunk, between the text before and after it
                        if piece.token_ids:
                            out.append(piece)
                            piece = ReplyChunk(logprobs=[] if records else None)
                        out.append(ReplyChunk(token_ids=[token], control=controls[token]))
                    elif token not in stops:
                        piece.text += decoder.push(token)
                        piece.token_ids.append(token)
                        if record is not None:
                            piece.logprobs.append(record)
                    if not interval or stream.empty():  # interval 0: a chunk per token, even when some queued up
                        break
                    token = stream.get()
                done = token is END
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
            while not stream.finished.wait(_CANCEL_POLL_SECONDS):  # the worker lets go at its next token
                end()  # (again, should the reply have moved to the batch meanwhile)
            ended = time.perf_counter()
            stats.batched = reply.batched
            stats.completion_tokens, stats.total_seconds = count, ended - queued
            stats.cached_tokens = stream.cached_tokens
            if first_at is not None and count > 1 and ended > first_at:
                stats.tokens_per_second = (count - 1) / (ended - first_at)
            finish = self._finish_reason(last_token in stops, count, params, stopped_here, cancel, stream.failure)
            stats.finish_reason = finish
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

    @staticmethod
    def _finish_reason(stopped_by_token: bool, count, params, stopped_here: bool, cancel, failure) -> str:
        if failure is not None:
            return "error"
        if stopped_by_token:
            return "stop"
        if count >= params.max_new_tokens:
            return "length"
        if stopped_here or (cancel is not None and cancel.is_set()):
            return "cancelled"
        return "stop"

    def generation_config(
        self, params: SamplingParams, stop_ids: list[int] | None = None, own_sampler: bool = False
    ) -> GenerationConfig:
        """transformers GenerationConfig for one reply on the worker; temperature 0 means greedy. With the engine's
        own sampler generate only takes the token it chose (greedy over its output), penalties included."""
        base = self.model.generation_config
        sampling = (
            {"do_sample": False}
            if params.greedy or own_sampler
            else {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
        )
        return GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            repetition_penalty=1.0 if own_sampler else params.repetition_penalty,
            eos_token_id=list(stop_ids or self._stop_ids),
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


def reply_stop_ids(tokenizer: ChatTokenizer, tools: bool = False) -> list[int]:
    """The ids that end a reply: end of turn, a turn header (the model opened the next turn without closing its own),
    and, without tools, <|action_start|>; with tools, <|action_end|> after the call."""
    base = [*tokenizer.stop_ids, *(i for i in tokenizer.header_ids if i not in tokenizer.stop_ids)]
    marker = "<|action_end|>" if tools else "<|action_start|>"
    return base + [tokenizer.tool_ids[marker]] if marker in tokenizer.tool_ids else base


def _texts(chunks: Reply[ReplyChunk]) -> Reply[str]:
    """The chunks' text; closing this closes them (which stops generation)."""
    with contextlib.closing(chunks):
        for chunk in chunks:
            if chunk.text:
                yield chunk.text


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
