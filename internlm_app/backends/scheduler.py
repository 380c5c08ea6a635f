"""Where each reply decodes: alone on the worker, or together in the continuous batch; who waits, and for what.

At most `plan.batch_slots` replies generate at once; later ones wait in a first-come-first-served line (`queue`)
that reports their place. A reply that starts while nothing runs goes to the worker (`generate`: a compiled static
cache on CUDA, KV reuse across turns). One that starts while another runs joins the batch, and the worker's reply
moves in with it: the worker stops at its next token and the batch continues from prompt + reply so far, so one
forward pass decodes them all (two paths side by side would read every weight twice per round). A reply the batch
cannot sample (a repetition penalty, the engine's own sampler) or that would not fit its paged cache waits for the
worker instead, in the worker's line and holding no slot until the worker is its own (a reply the batch can decode
that runs there moves into the batch, as for any newcomer); stop ids of a reply's own (tools offered) go with it on
either path. The two lines share one limit on waiting replies.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LogitsProcessor

from internlm_app.backends.batching import BatchDecoder
from internlm_app.backends.decode_plan import DecodePlan
from internlm_app.backends.gpu_queue import GpuQueue
from internlm_app.backends.token_stream import TokenStream
from internlm_app.backends.worker import GenerationJob, GenerationWorker
from internlm_app.chat_types import DecodeReason, GenerationError, QueueAdmission
from internlm_app.sampling import SamplingParams


@dataclass
class Reply:
    """One reply being decoded: its token stream, and where it runs (the worker's job, then maybe a batch request)."""

    stream: TokenStream
    stop: threading.Event
    batch: BatchDecoder | None = None
    batchable: bool = False
    batched: bool = False
    job: GenerationJob | None = None
    request_id: str | None = None

    def end(self) -> None:
        """Stop it at its next token (safe to call again, also after it moved into the batch)."""
        self.stop.set()
        if self.request_id is not None:
            self.batch.cancel(self.request_id)


class ReplyScheduler:
    """Admits replies (FIFO, up to the batch size) and starts each on the worker or in the batch. Thread-safe."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        plan: DecodePlan,
        stop_ids: list[int],
        pad_token_id: int,
        context_window: int,
        queue_limit: int,
        empty_cache_after_reply: bool,
        generation_config: Callable[[SamplingParams, list[int] | None, bool], GenerationConfig],
    ):
        self.model = model
        self.plan = plan
        self.static_cache = plan.single_path == "static"  # read by the worker at each reply
        self._stop_ids, self._pad_token_id = stop_ids, pad_token_id
        self._queue_limit = queue_limit
        self._generation_config = generation_config
        self._worker_line = GpuQueue(max_waiting=queue_limit)  # the worker decodes one reply at a time
        self.queue = GpuQueue(max_waiting=queue_limit, slots=plan.batch_slots, shares_limit_with=self._worker_line)
        self.worker = GenerationWorker(
            model,
            static_window=lambda: context_window if self.static_cache else None,
            kv_reuse_tokens=plan.kv_reuse_tokens,
            empty_cache_after_reply=empty_cache_after_reply,
        )
        self._batch: BatchDecoder | None = None
        self._lock = threading.Lock()
        self._worker_reply: Reply | None = None  # the reply the worker decodes now
        self._moving = 0  # replies joining the batch or waiting for the worker now: the worker's reply moves
        self.closed = False

    def batch_decoder(self) -> BatchDecoder | None:
        """The continuous batch, started on first use (the engine starts it while loading); None when off."""
        if not self.plan.batching:
            return None
        with self._lock:
            if self.closed:
                raise GenerationError("the engine was closed")
            if self._batch is None:
                self._batch = BatchDecoder(
                    self.model,
                    stop_ids=self._stop_ids,
                    pad_token_id=self._pad_token_id,
                    slots=self.plan.batch_slots,
                    cache_tokens=self.plan.batch_cache_tokens,
                    page_size=self.plan.page_size,
                )
            return self._batch

    def start(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        cancel: threading.Event | None,
        on_wait: Callable[[int], None] | None,
        path: str | None = None,
        *,
        logits_processor: LogitsProcessor | None = None,
        stop_ids: list[int] | None = None,
        admission: QueueAdmission | None = None,
    ) -> Reply | None:
        """Wait for a slot (and for the worker if it must be the worker), then start the reply; None if cancelled
        while waiting. Raises QueueFullError when too many wait, GenerationError when the engine is closed.

        `path` forces "worker" or "batch" (the warm-up uses it); by default the scheduler chooses. A reply with a
        `logits_processor` (the engine's sampler) decodes on the worker; `stop_ids` other than the model's (a reply
        offered tools) go with the reply on either path. A reply with an `admission` (a choice of a request let in
        as one, `GpuQueue.reserve`) is never refused by the queue limit.
        """
        if self.closed:
            raise GenerationError("the engine was closed")
        if stop_ids is not None and stop_ids == self._stop_ids:
            stop_ids = None
        own = (logits_processor, stop_ids)
        if (
            path == "worker"
            or logits_processor is not None
            or (path is None and not self._batchable(prompt_ids, params))
        ):
            return self._start_on_worker(prompt_ids, params, cancel, on_wait, *own, admission=admission)
        if not self.queue.acquire(on_wait=on_wait, cancel=cancel, admission=admission):
            return None
        try:
            # The worker when nothing else runs (its line taken only if free at once: never waited for while
            # holding a slot, the order the worker's own replies take them in); the batch otherwise.
            if path is None and (self._batch is None or self._batch.active == 0) and self._worker_line.try_acquire():
                return self._start("worker", prompt_ids, params, threading.Event(), cancel, *own)
            with self._worker_reply_moves_to_batch():
                return self._start("batch", prompt_ids, params, threading.Event(), cancel, *own)
        except BaseException:
            self.queue.release()
            raise

    def _start_on_worker(
        self, prompt_ids, params, cancel, on_wait, logits_processor, stop_ids, admission=None
    ) -> Reply | None:
        """A reply only the worker can decode takes the worker's line first, then a slot: while it waits for the
        worker it holds no slot, so the replies the batch can decode go on beside the one the worker decodes. Its
        place meanwhile counts the replies in both lines ahead of it (those that came before it and wait for a slot
        will get one first); once it has the worker, it waits for a slot ahead of the replies that came after it.
        A reply the batch can decode that runs on the worker now moves into the batch rather than be waited for."""
        arrived = self._worker_line.ticket()  # one order of arrival for both lines
        in_both = None if on_wait is None else (lambda place: on_wait(place + self.queue.in_line(before=arrived)))
        with self._worker_reply_moves_to_batch():
            waited = not self._worker_line.try_acquire()
            if waited and not self._worker_line.acquire(
                on_wait=in_both, cancel=cancel, ticket=arrived, admission=admission
            ):
                return None
        try:
            # One that waited for the worker has passed the limit: it is not refused now for those behind it.
            if not self.queue.acquire(
                on_wait=on_wait, cancel=cancel, ticket=arrived, admitted=waited, admission=admission
            ):
                self._worker_line.release()
                return None
        except BaseException:
            self._worker_line.release()
            raise
        try:
            return self._start("worker", prompt_ids, params, threading.Event(), cancel, logits_processor, stop_ids)
        except BaseException:  # _start gave the worker's line back
            self.queue.release()
            raise

    @contextmanager
    def _worker_reply_moves_to_batch(self) -> Iterator[None]:
        """While a reply joins the batch or waits for the worker: the worker's reply, if the batch can decode it,
        stops at its next token and goes on in the batch, also one that starts on the worker meanwhile (`_start`)."""
        with self._lock:
            running = self._worker_reply
            self._moving += 1
        if running is not None and running.batchable:
            running.job.preempt.set()  # the worker hands the reply to the batch (see `hand_off`)
        try:
            yield
        finally:
            with self._lock:
                self._moving -= 1

    def _batchable(self, prompt_ids: list[int], params: SamplingParams) -> bool:
        """Whether the batch can decode this reply: its sampling, and its length within the paged cache."""
        needed = len(prompt_ids) + params.max_new_tokens
        return (
            self.plan.batching and BatchDecoder.unsupported(params) is None and needed <= self.plan.batch_cache_tokens
        )

    def _start(self, path, prompt_ids, params, stop, cancel, logits_processor=None, stop_ids=None) -> Reply:
        stream = TokenStream(on_finish=self.queue.release)
        if path == "batch":
            reply = Reply(stream, stop, batch=self.batch_decoder(), batched=True)
            reply.request_id = reply.batch.submit(prompt_ids, params, stream, stop, cancel, stop_ids)
            return reply
        reply = Reply(stream, stop, batchable=logits_processor is None and self._batchable(prompt_ids, params))

        def hand_off(ids: list[int], generated: int) -> bool:  # in the worker's thread, once preempted
            # Raises if the batch cannot take it: the reply then ends with that error, never silently cut short.
            rest = params.model_copy(update={"max_new_tokens": params.max_new_tokens - generated})
            reply.batch = self.batch_decoder()
            reply.request_id = reply.batch.submit(ids, rest, stream, stop, cancel, stop_ids)
            reply.batched = True
            return True

        def worker_done() -> None:
            with self._lock:
                self._worker_reply = None
            self._worker_line.release()

        try:
            config = self._generation_config(params, stop_ids, logits_processor is not None)
            reply.job = GenerationJob(
                prompt_ids,
                config,
                stream,
                stop,
                cancel,
                hand_off=hand_off,
                on_done=worker_done,
                logits_processor=logits_processor,
            )
            with self._lock:  # either close() finds this reply and cuts it, or this finds the engine closed
                if self.closed:
                    raise GenerationError("the engine was closed")
                self._worker_reply = reply
                if reply.batchable and (self._moving or (self._batch is not None and self._batch.active)):
                    reply.job.preempt.set()  # another reply joined the batch since this one chose the worker
            self.worker.submit(reply.job)
        except BaseException:
            worker_done()
            raise
        return reply

    def stop_batching(self, reason: DecodeReason) -> None:
        """Decode one reply at a time from now on (the batch failed to start); `reason` goes into the plan."""
        with self._lock:
            batch, self._batch = self._batch, None
            self.plan = self.plan.without_batching(reason)
            self.queue = GpuQueue(max_waiting=self._queue_limit, slots=1, shares_limit_with=self._worker_line)
        if batch is not None:
            batch.close()

    def stop_static_cache(self, reason: DecodeReason) -> None:
        """Decode on the dynamic cache from now on (the compiled static cache failed); `reason` goes into the plan."""
        self.static_cache = False
        self.worker.drop_static_cache()
        self.plan = self.plan.with_dynamic_cache(reason)

    def close(self) -> None:
        """Stop the worker and the batch's threads; a reply still running ends at its next token. Idempotent."""
        with self._lock:
            self.closed = True
            running, batch, self._batch = self._worker_reply, self._batch, None
        if running is not None:  # cut short: it ends with an error, as the batch's replies do, never as a whole reply
            running.stream.finish(GenerationError("the engine was closed"))
            running.end()
        self.worker.close()
        if batch is not None:
            batch.close()
