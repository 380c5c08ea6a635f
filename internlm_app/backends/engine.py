"""The chat engine: the one seam between a loaded model and every caller (web app, API, CLI)."""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Iterator

import torch
from transformers import GenerationConfig

from internlm_app.backends.batching import BatchDecoder
from internlm_app.backends.decode_plan import DecodePlan, plan_decoding, reason
from internlm_app.backends.gpu_queue import GpuQueue
from internlm_app.backends.prompt_fit import PreparedPrompt, fit_prompt
from internlm_app.backends.reply_stream import ReplyPlan, describe_failure, reply_chunks, texts_of
from internlm_app.backends.sampler import TokenSampler
from internlm_app.backends.scheduler import ReplyScheduler
from internlm_app.backends.worker import GenerationWorker
from internlm_app.chat_types import (
    DecodingState,
    DeviceMemory,
    GenerationError,
    InvalidRequestError,
    Message,
    ModelInfo,
    QueueAdmission,
    Reply,
    ReplyChunk,
    ReplyEvents,
    ReplyOptions,
    ReplyStats,
    history_to_messages,
)
from internlm_app.load_progress import LoadStep, Progress
from internlm_app.runtime import gpu
from internlm_app.runtime.grammar import GrammarCompiler
from internlm_app.runtime.loader import ModelLoadError, freeze_long_lived_objects, load_model
from internlm_app.runtime.tokenizer import ChatTokenizer, reply_stop_ids
from internlm_app.sampling import SamplingParams
from internlm_app.settings import DEFAULT_SYSTEM_PROMPT, ModelSettings

log = logging.getLogger(__name__)


NO_OPTIONS = ReplyOptions()


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
        freeze_long_lived_objects()
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
            self.scheduler.stop_static_cache(reason("static_warmup_failed", error=exc))
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
                self.scheduler.stop_batching(reason("batch_start_failed", error=exc))

    def close(self) -> None:
        """Stop the worker and the batch's threads; a reply still running ends at its next token. Idempotent.

        Runs at interpreter exit for every engine: a daemon thread that is inside torch's C++ code while the
        interpreter finalizes aborts the process ("terminate called without an active exception", exit code 134).
        """
        self.scheduler.close()

    def release_memory(self) -> tuple[list[DeviceMemory], list[DeviceMemory]]:
        """Drop the KV caches kept for reuse across turns and release cached CUDA blocks; GPU memory before, after.

        Replies that run keep their caches: only idle ones go (the next turn of those chats prefills again).
        """
        self.worker.forget_kv()
        return gpu.clear_cache()

    @property
    def context_window(self) -> int:
        return self.info.context_window

    def unavailable(self) -> str | None:
        """The model is in this process: available while the engine is open."""
        return "the engine was closed" if self.scheduler.closed else None

    def decoding(self) -> DecodingState:
        """The decode plan chosen at load (with its reasons) and the KV cache kept across turns now."""
        return self.plan.state(self.worker.kept_tokens)

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
        """Validate `messages` and build prompt ids that fit the context window (see `prompt_fit.fit_prompt`).

        `max_length` narrows the budget for this request (never beyond the model's window). Raises
        InvalidRequestError or ContextTooLongError.
        """
        window = self.context_window if max_length is None else min(max_length, self.context_window)
        return fit_prompt(self.tokenizer, messages, max_new_tokens, window, options)

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
        return texts_of(chunks)

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
        return self._stream(prepared, params, cancel, events or ReplyEvents(), plan=plan, admission=options.admission)

    def _reply_plan(self, params: SamplingParams, options: ReplyOptions) -> ReplyPlan:
        tools = options.tools or options.force_tool_call
        if tools and "<|action_end|>" not in self.tokenizer.tool_ids:
            raise InvalidRequestError("tools: this model's vocabulary has no tool tokens, so it cannot call tools")
        stop_ids = self._tool_stop_ids if tools else self._stop_ids
        controls = {i: name for name, i in self.tokenizer.tool_ids.items()} if tools else {}
        # (A call's JSON may hold a stop string: with tools, only the reader cuts the content.)
        stop_strings = None if tools else options.stop
        if not options.needs_sampler:
            return ReplyPlan(stop_ids, controls, stop_strings=stop_strings)
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
        return ReplyPlan(stop_ids, controls, sampler, stop_strings)

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
        plan: ReplyPlan,
        path: str | None = None,
        admission: QueueAdmission | None = None,
    ) -> Reply[ReplyChunk]:
        stats = events.stats
        stats.prompt_tokens, stats.dropped_messages = len(prepared.ids), prepared.dropped_messages
        queued = time.perf_counter()
        own_stops = None if plan.stop_ids == self._stop_ids else plan.stop_ids
        try:
            reply = self.scheduler.start(
                prepared.ids,
                params,
                cancel,
                events.on_queue,
                path,
                logits_processor=plan.sampler,
                stop_ids=own_stops,
                admission=admission,
            )
        except BaseException as exc:
            stats.queue_seconds = time.perf_counter() - queued
            stats.finish_reason, stats.error = "error", describe_failure(exc)
            raise
        stats.queue_seconds = time.perf_counter() - queued
        if reply is None:  # cancelled while waiting
            stats.finish_reason = "cancelled"
            return
        yield from reply_chunks(
            reply,
            self.tokenizer,
            plan,
            params,
            stats,
            cancel=cancel,
            queued=queued,
            interval=self.settings.stream_interval_ms / 1000,
        )

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


_ENGINES: weakref.WeakSet[ChatEngine] = weakref.WeakSet()


def _close_at_exit(engine: ChatEngine) -> None:
    if not _ENGINES:
        atexit.register(_close_engines)  # once per process (registering again is harmless: close is idempotent)
    _ENGINES.add(engine)


def _close_engines() -> None:
    for engine in list(_ENGINES):
        engine.close()
