"""The one-reply path: a long-lived thread that runs `generate` for one reply at a time, reusing KV across turns.

Why one thread for the whole process rather than one per reply: on an H200 VM, `generate` in a fresh thread ran at
18 tokens/s against 51 in a thread that had already generated (62-77 ms of CPU per token against 23-29 ms); a
persistent thread warmed up over its first replies (11.6, 28.0, 40.8 tokens/s). torch.compile's CUDA graph trees are
also kept per thread, so the compiled static-cache step is recorded once, here, while loading.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from queue import SimpleQueue

import torch
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StaticCache,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from internlm_app.backends.forward_lock import ForwardLock
from internlm_app.backends.prefix_cache import PrefixCache
from internlm_app.backends.token_stream import TokenStream
from internlm_app.chat_types import GenerationError
from internlm_app.runtime import gpu

log = logging.getLogger(__name__)

THREAD_NAME = "internlm-generate"


class _TokenStreamer(BaseStreamer):
    """Hands each new token id to the stream; the prompt (first put) is skipped."""

    def __init__(self, stream: TokenStream):
        self._stream = stream
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self._stream.put(value.reshape(-1).tolist())

    def end(self) -> None:
        pass  # the worker ends the stream itself, also when generate() raises


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


class _HandOverBetweenSteps(StoppingCriteria):
    """Never stops; between two decode steps it lets the batch's thread run a forward pass (see forward_lock)."""

    def __init__(self, lock: ForwardLock):
        self._lock = lock
        self._answers: dict[tuple, torch.BoolTensor] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self._lock.hand_over()
        key = (input_ids.shape[0], input_ids.device)
        if key not in self._answers:
            self._answers[key] = torch.zeros(key[0], dtype=torch.bool, device=input_ids.device)
        return self._answers[key]


@dataclass
class GenerationJob:
    """One reply for the worker: prompt ids, how to sample, where the tokens go, what stops it.

    Setting `preempt` stops generate at the next token like `stop`, but the reply is not over: the worker calls
    `hand_off(prompt and reply ids so far, tokens generated)`, which continues it elsewhere (the batch) on the same
    stream and returns True; if it raises, the reply ends here with that error. `on_done` runs once the worker has
    let go.
    """

    prompt_ids: list[int]
    config: GenerationConfig
    stream: TokenStream
    stop: threading.Event
    cancel: threading.Event | None = None
    preempt: threading.Event = field(default_factory=threading.Event)
    hand_off: Callable[[list[int], int], bool] | None = None
    on_done: Callable[[], None] | None = None
    logits_processor: LogitsProcessor | None = None  # the engine's own sampler (backends/sampler.py), if any


class GenerationWorker:
    """Runs jobs one at a time in one daemon thread, started with the engine and alive as long as the process.

    Every job's stream ends (END, with the failure if generate raised), whatever happens; a failure clears the CUDA
    cache and the kept KV caches, and the worker takes the next job.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        static_window: Callable[[], int | None],
        kv_reuse_tokens: int,
        empty_cache_after_reply: bool = False,
    ):
        self.model = model
        self._lock = ForwardLock.for_model(model)
        self._static_window = static_window  # asked per job: the static cache's length, or None for dynamic
        self._jobs: SimpleQueue[GenerationJob | None] = SimpleQueue()
        self._closing = False  # the end (None) is in the line: a job put after it would never run
        self._submit_lock = threading.Lock()
        self._empty_cache_after_reply = empty_cache_after_reply
        self._dynamic = PrefixCache(lambda: DynamicCache(config=model.config), kv_reuse_tokens)
        self._static: PrefixCache | None = None
        self._static_buffer: StaticCache | None = None
        self._static_len = 0
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def kept_tokens(self) -> int:
        """Tokens of KV cache kept for reuse now (the static buffer counts what it holds, not its length)."""
        return self._dynamic.tokens + (self._static.tokens if self._static is not None else 0)

    def submit(self, job: GenerationJob) -> None:
        """Queue a job; raises GenerationError once the worker stops or is closing (the job would never run)."""
        with self._submit_lock:
            if self._closing or not self._thread.is_alive():
                raise GenerationError("the generation worker has stopped")
            self._jobs.put(job)

    def close(self) -> None:
        """Stop the thread after the jobs already queued (idempotent); later jobs are refused."""
        with self._submit_lock:
            closing, self._closing = self._closing, True
        if not closing and self._thread.is_alive():
            self._jobs.put(None)
        self._thread.join()

    def drop_static_cache(self) -> None:
        """Free the static cache's buffer (the engine went back to the dynamic cache)."""
        self._static = self._static_buffer = None
        self._static_len = 0

    def forget_kv(self) -> None:
        """Drop every KV cache kept for reuse (frees their GPU memory)."""
        self._dynamic.clear()
        if self._static is not None:
            self._static.clear()

    def _prefix_cache(self) -> PrefixCache:
        window = self._static_window()
        if window is None:
            return self._dynamic
        if self._static is None or self._static_len != window:
            self._static_buffer, self._static_len = StaticCache(config=self.model.config, max_cache_len=window), window
            self._static = PrefixCache(self._fresh_static_buffer, self._dynamic.max_tokens, single_buffer=True)
        return self._static

    def _fresh_static_buffer(self) -> StaticCache:
        self._static_buffer.reset()  # zeroed, length 0: also after a failure left its layers uneven
        return self._static_buffer

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._generate(job)

    def _generate(self, job: GenerationJob) -> None:
        failure: BaseException | None = None
        kept, handed_off = None, False
        self._lock.acquire()  # held for each decode step, handed over between steps
        try:
            store = self._prefix_cache()
            with torch.inference_mode():  # the cache's tensors are inference tensors: crop and reset them here too
                cache, job.stream.cached_tokens = store.lend(job.prompt_ids)
                input_ids = torch.tensor([job.prompt_ids], device=self.model.device)
                extra = {}
                if job.logits_processor is not None:  # the engine's own sampler (only then: the call stays plain)
                    extra["logits_processor"] = LogitsProcessorList([job.logits_processor])
                output = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    cache=cache,
                    generation_config=job.config,
                    streamer=_TokenStreamer(job.stream),
                    **extra,
                    stopping_criteria=StoppingCriteriaList(
                        [_StopWhenSet(job.stop, job.cancel, job.preempt), _HandOverBetweenSteps(self._lock)]
                    ),
                )
            kept = (store, cache, output[0].tolist())
        except BaseException as exc:  # e.g. CUDA out of memory: reported to the consumer, never swallowed
            log.error("generation failed: %s: %s", type(exc).__name__, exc)
            failure = exc
        finally:
            self._lock.release_all()
        try:
            if failure is not None:
                self.forget_kv()  # a cache a failed forward wrote into is not trusted again
            elif kept is not None:
                kept[0].give_back(kept[1], kept[2])
                handed_off = self._hand_off(job, kept[2])
            if failure is not None or self._empty_cache_after_reply:
                gpu.clear_cache()
        except BaseException as exc:  # a sticky CUDA error raises again here: report it, never wedge the worker
            failure = failure or exc
        finally:
            if job.on_done is not None:
                job.on_done()  # first: a reply that follows at once finds the worker free
            if not handed_off:
                job.stream.finish(failure)

    @staticmethod
    def _hand_off(job: GenerationJob, ids: list[int]) -> bool:
        """Continue a preempted reply elsewhere, unless it ended anyway (stop id, length, stop or cancel)."""
        generated = len(ids) - len(job.prompt_ids)
        stop_ids = job.config.eos_token_id if isinstance(job.config.eos_token_id, list) else [job.config.eos_token_id]
        if (
            job.hand_off is None
            or not job.preempt.is_set()
            or job.stop.is_set()
            or (job.cancel is not None and job.cancel.is_set())
            or generated >= job.config.max_new_tokens
            or (generated > 0 and ids[-1] in stop_ids)
        ):
            return False
        return job.hand_off(ids, generated)
