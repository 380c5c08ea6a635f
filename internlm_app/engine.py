"""The chat engine: the one seam between a loaded model and every caller (web app, API, CLI)."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from queue import SimpleQueue

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from . import gpu
from .chat_types import (
    ContextTooLongError,
    GenerationError,
    InvalidRequestError,
    Message,
    QueueFullError,
    ReplyEvents,
    ReplyStats,
    history_to_messages,
)
from .convert import Progress
from .gpu_queue import GpuQueue
from .loader import ModelInfo, ModelLoadError, load_model
from .sampling import SamplingParams
from .settings import DEFAULT_SYSTEM_PROMPT, Settings
from .tokenizer import ChatTokenizer

log = logging.getLogger(__name__)

_END = object()


class _TokenStreamer(BaseStreamer):
    """Hands each new token id to the consuming thread; the prompt (first put) is skipped."""

    def __init__(self, tokens: SimpleQueue):
        self._tokens = tokens
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self._tokens.put(token)

    def end(self) -> None:
        pass  # the generation thread signals the end itself, also when generate() raises


class _StopWhenSet(StoppingCriteria):
    """Stops generate() at the next token once any of the events is set."""

    def __init__(self, *events: threading.Event | None):
        self._events = [e for e in events if e is not None]
        self._answers: dict[tuple, torch.BoolTensor] = {}  # generate() only reads them: made once, not per token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        key = (any(e.is_set() for e in self._events), input_ids.shape[0], input_ids.device)
        if key not in self._answers:
            self._answers[key] = torch.full(key[1:2], key[0], dtype=torch.bool, device=input_ids.device)
        return self._answers[key]


@dataclass
class PreparedPrompt:
    """Prompt ids that fit the context budget, how many history messages were left out, the reply's token cap."""

    ids: list[int]
    dropped_messages: int
    max_new_tokens: int


class ChatEngine:
    """Streams replies from one model; generation is serialized by a FIFO GPU queue."""

    def __init__(self, model: torch.nn.Module, tokenizer: ChatTokenizer, info: ModelInfo, settings: Settings):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.settings = settings
        self.queue = GpuQueue(max_waiting=settings.queue_limit)
        # transformers compiles the decode step by itself for a static cache on CUDA; on the CPU it would only be slower
        self.static_cache = settings.static_cache and model.device.type == "cuda"

    @classmethod
    def load(cls, settings: Settings, progress: Progress | None = None) -> ChatEngine:
        model, tokenizer, info = load_model(settings, progress=progress)
        _freeze_long_lived_objects()
        engine = cls(model, tokenizer, info, settings)
        if engine.static_cache:
            log.info("compiling the decode step for the static cache (a warm-up reply)")  # a step the web app shows
            engine.warm_up()
        return engine

    def warm_up(self) -> None:
        """Reply once, a few tokens, so that compiling the decode step happens while loading, not in the first chat."""
        started = time.perf_counter()
        try:
            self.reply([{"role": "user", "content": "hi"}], SamplingParams.greedy_params(8))
        except GenerationError as exc:
            raise ModelLoadError(
                f"the warm-up reply for the static cache failed: {exc}. Start without INTERNLM_STATIC_CACHE, or check "
                "that torch.compile works here (Triton, from the CUDA torch wheel, and a C compiler such as gcc)."
            ) from exc
        log.info("warm-up reply done in %.1fs", time.perf_counter() - started)

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
        within one token. A failure in the generation thread raises GenerationError from the iterator.
        """
        prepared = self.prepare(messages, params.max_new_tokens, max_length)
        if prepared.max_new_tokens != params.max_new_tokens:
            params = params.model_copy(update={"max_new_tokens": prepared.max_new_tokens})
        return self._stream(prepared, params, cancel, events or ReplyEvents())

    def _stream(
        self, prepared: PreparedPrompt, params: SamplingParams, cancel: threading.Event | None, events: ReplyEvents
    ) -> Iterator[str]:
        stats = events.stats
        stats.prompt_tokens, stats.dropped_messages = len(prepared.ids), prepared.dropped_messages
        queued = time.perf_counter()
        try:
            acquired = self.queue.acquire(on_wait=events.on_queue, cancel=cancel)
        except QueueFullError as exc:
            stats.finish_reason, stats.error = "error", str(exc)
            raise
        stats.queue_seconds = time.perf_counter() - queued
        if not acquired:
            stats.finish_reason = "cancelled"
            return
        tokens: SimpleQueue = SimpleQueue()
        stop, finished = threading.Event(), threading.Event()
        failure: list[BaseException] = []
        worker = threading.Thread(
            target=self._generate,
            args=(prepared.ids, params, tokens, stop, cancel, failure, finished),
            name="internlm-generate",
            daemon=True,
        )
        started = time.perf_counter()
        try:
            worker.start()
        except BaseException:
            self.queue.release()
            raise
        decoder = self.tokenizer.stream_decoder()
        interval = self.settings.stream_interval_ms / 1000
        count, first_at, last_token, next_at, done = 0, None, None, 0.0, False
        try:
            while not done:
                if (wait := next_at - time.perf_counter()) > 0:
                    # Tokens that come meanwhile go out together (one wake-up, not one per token); the end of the
                    # reply, an error or a cancel ends the wait at once.
                    finished.wait(wait)
                text, token = "", tokens.get()
                while token is not _END:
                    count, last_token = count + 1, token
                    if first_at is None:
                        first_at = time.perf_counter()
                        stats.time_to_first_token = first_at - started
                    text += decoder.push(token)
                    if not interval or tokens.empty():  # interval 0: a chunk per token, even when some queued up
                        break
                    token = tokens.get()
                done = token is _END
                if done:
                    text += decoder.flush()
                if text:
                    next_at = time.perf_counter() + interval
                    yield text
        finally:
            stop.set()  # a consumer that went away (closed iterator) stops generation too
            worker.join()
            ended = time.perf_counter()
            stats.completion_tokens, stats.total_seconds = count, ended - queued
            if first_at is not None and count > 1 and ended > first_at:
                stats.tokens_per_second = (count - 1) / (ended - first_at)
            stats.finish_reason = self._finish_reason(last_token, count, params, stop, cancel, failure)
        if failure:
            stats.error = _describe(failure[0])
            raise GenerationError(stats.error) from failure[0]

    def _finish_reason(self, last_token, count, params, stop, cancel, failure) -> str:
        if failure:
            return "error"
        if last_token in self.tokenizer.stop_ids:
            return "stop"
        if count >= params.max_new_tokens:
            return "length"
        if stop.is_set() or (cancel is not None and cancel.is_set()):
            return "cancelled"
        return "stop"

    def _generate(self, prompt_ids, params, tokens, stop, cancel, failure, finished) -> None:
        """Body of the generation thread: always frees the GPU queue and ends the token stream."""
        try:
            with torch.inference_mode():
                input_ids = torch.tensor([prompt_ids], device=self.model.device)
                self.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    generation_config=self.generation_config(params),
                    streamer=_TokenStreamer(tokens),
                    stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop, cancel)]),
                )
        except BaseException as exc:  # e.g. CUDA out of memory: reported to the consumer, never swallowed
            log.error("generation failed: %s", _describe(exc))
            failure.append(exc)
        finally:
            try:
                if failure or self.settings.empty_cache_after_reply:
                    gpu.clear_cache()
            except BaseException as exc:  # a sticky CUDA error raises again here: report it, never wedge the queue
                failure.append(exc)
            finally:
                self.queue.release()
                tokens.put(_END)
                finished.set()

    def generation_config(self, params: SamplingParams) -> GenerationConfig:
        """transformers GenerationConfig for one reply; temperature 0 means greedy."""
        base = self.model.generation_config
        sampling = (
            {"do_sample": False}
            if params.greedy
            else {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k}
        )
        # One cache length for every reply, so the compiled decode step is reused rather than compiled again.
        static = {"cache_implementation": "static", "max_cache_len": self.context_window} if self.static_cache else {}
        return GenerationConfig(
            **static,
            max_new_tokens=params.max_new_tokens,
            repetition_penalty=params.repetition_penalty,
            eos_token_id=list(self.tokenizer.stop_ids),
            pad_token_id=base.pad_token_id if base.pad_token_id is not None else self.tokenizer.stop_ids[0],
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


def _freeze_long_lived_objects() -> None:
    """Move what is alive once the model is loaded out of the cyclic garbage collector's sight.

    torch, transformers and the web or API stack leave some 300-400k tracked objects; a full collection scans them all
    while holding the GIL (0.2-0.3 s on this project's 2-core test VM), a stall in the middle of a streamed reply.
    Frozen, a collection scans only the objects made since. Frozen objects stay out of every collection until
    `gc.unfreeze()`: nothing unloads a model today; a feature that does must unfreeze first.
    """
    gc.collect()
    gc.freeze()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return f"GPU out of memory: {exc}. The cache was cleared; try fewer max new tokens or a shorter conversation."
    return f"{type(exc).__name__}: {exc}"
