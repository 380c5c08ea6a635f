"""Concurrent replies decoded together: transformers' continuous batching over a paged KV cache.

One `ContinuousBatchingManager` per engine, started while the model loads and kept for the whole process: its thread
schedules every running reply into each forward pass, so a reply that arrives while others generate joins the batch at
the next step. Its paged cache shares complete pages between prompts with the same prefix (the turns a chat already
had). One dispatcher thread reads the manager's outputs and hands each reply its new tokens.

Sampling is per request (temperature, top-p, top-k); greedy is top-k 1, so an exact tie for the highest logit is
broken at random here (`generate` takes the lowest id). A repetition penalty has no per-request form in the batch, so
`unsupported()` names it and the engine decodes such a reply on the one-reply path instead.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from internlm_app.backends.forward_lock import ForwardLock
from internlm_app.backends.token_stream import TokenStream
from internlm_app.chat_types import GenerationError
from internlm_app.runtime import gpu
from internlm_app.sampling import SamplingParams

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.1  # how long the dispatcher waits for an output before it checks the manager is alive


@dataclass
class _Request:
    stream: TokenStream
    stop: threading.Event
    cancel: threading.Event | None
    delivered: int = 0

    def should_stop(self) -> bool:
        return self.stop.is_set() or (self.cancel is not None and self.cancel.is_set())


class BatchDecoder:
    """Decodes up to `slots` replies at once; thread-safe. Every submitted stream ends (END), also when the batch fails.

    A failed forward pass fails the replies in it (the error says so); the manager is started again for the next
    reply, and replies that arrive later are unaffected.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        stop_ids: list[int],
        pad_token_id: int,
        slots: int,
        cache_tokens: int,
        page_size: int,
    ):
        self.model = model
        ForwardLock.for_model(model)  # the batch's forwards and the worker's decode steps take turns
        self.slots = slots
        self._vocab_size = model.config.get_text_config().vocab_size
        self._config, self._cb_config = manager_configs(
            model,
            stop_ids=stop_ids,
            pad_token_id=pad_token_id,
            slots=slots,
            cache_tokens=cache_tokens,
            page_size=page_size,
        )
        self._lock = threading.Lock()
        self._requests: dict[str, _Request] = {}
        self._ids = itertools.count(1)
        self._manager = None
        self._closed = threading.Event()
        self._call_in_daemon_thread(self._start_manager)
        self._dispatcher = threading.Thread(target=self._dispatch, name="internlm-batch-outputs", daemon=True)
        self._dispatcher.start()

    @property
    def active(self) -> int:
        """Replies in the batch now (decoding or about to)."""
        with self._lock:
            return len(self._requests)

    @staticmethod
    def unsupported(params: SamplingParams) -> str | None:
        """The sampling field the batch cannot apply to a reply (its name), or None."""
        if params.repetition_penalty != 1.0:
            return "repetition_penalty"
        return None

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        stream: TokenStream,
        stop: threading.Event,
        cancel: threading.Event | None = None,
        stop_ids: list[int] | None = None,
    ) -> str:
        """Add a reply to the running batch; its token ids go to `stream`. Returns the request id for `cancel`.

        `stop_ids` end this reply instead of the batch's own (a reply offered tools stops at <|action_end|>).
        """
        if (field_name := self.unsupported(params)) is not None:
            raise ValueError(f"the batch cannot apply {field_name}")
        sampling = request_sampling(params, self._vocab_size)
        request_id = f"reply-{next(self._ids)}"
        with self._lock:
            if self._closed.is_set():
                raise GenerationError("the batch decoder was closed")
            if self._manager is None or not self._manager.is_running():
                self._fail_all_locked("the batch decoder stopped")
                self._call_in_daemon_thread(self._start_manager)
            if self._manager is None or not self._manager.is_running():
                raise GenerationError("the continuous batch could not start (see the server log)")
            self._requests[request_id] = _Request(stream, stop, cancel)
        try:
            accepted = self._manager.add_request(
                list(prompt_ids),
                request_id=request_id,
                max_new_tokens=params.max_new_tokens,
                streaming=True,
                eos_token_id=list(stop_ids) if stop_ids is not None else None,  # None: the generation config's
                **sampling,
            )
        except Exception as exc:
            with self._lock:  # never left registered: its stream is the caller's to end
                self._requests.pop(request_id, None)
            raise GenerationError(f"the continuous batch could not take the reply: {exc}") from exc
        if accepted is None:  # the manager refused it (stopping): end the reply with an error, never leave it waiting
            self._end(request_id, GenerationError("the batch decoder is not accepting replies; try again"))
        return request_id

    def cancel(self, request_id: str) -> None:
        """Stop a reply at the batch's next step; its stream ends at once."""
        if self._end(request_id, None) and self._manager is not None:
            self._manager.cancel_request(request_id)

    def close(self) -> None:
        """Stop the manager's thread and the dispatcher; replies still in the batch end with an error. Idempotent."""
        self._closed.set()
        self._dispatcher.join()
        if self._manager is not None and self._manager.is_running():
            self._manager.stop(block=True, hard_stop=True)
        with self._lock:
            self._fail_all_locked("the batch decoder was closed")

    @staticmethod
    def _call_in_daemon_thread(fn) -> None:
        # A new thread is a daemon when the thread that creates it is one: the manager's generation thread, started
        # from here, then never keeps the process alive at exit.
        starter = threading.Thread(target=fn, name="internlm-batch-start", daemon=True)
        starter.start()
        starter.join()

    def _start_manager(self) -> None:
        # Its INFO lines (cache sizes, the random seed it draws) would go to stderr on every start, CLI included.
        logging.getLogger("ContinuousBatchingLogger").setLevel(logging.WARNING)
        try:
            if self._manager is None:
                self._manager = self.model.init_continuous_batching(
                    generation_config=self._config, continuous_batching_config=self._cb_config
                )
            with torch.inference_mode():
                self._manager.start()  # the generation loop runs in the caller's inference mode
        except Exception:  # submit() sees a manager that does not run and says so
            log.exception("starting the continuous batch failed")

    def _end(self, request_id: str, failure: BaseException | None) -> bool:
        with self._lock:
            request = self._requests.pop(request_id, None)
        if request is None:
            return False
        request.stream.finish(failure)
        return True

    def _fail_all_locked(self, why: str) -> None:
        requests, self._requests = self._requests, {}
        for request in requests.values():
            request.stream.finish(GenerationError(why))

    def _dispatch(self) -> None:
        while not self._closed.is_set():
            manager = self._manager
            output = manager.get_result(timeout=_POLL_SECONDS) if manager is not None else None
            if output is None:
                if manager is None or not manager.is_running():
                    with self._lock:
                        if self._requests and (self._manager is None or not self._manager.is_running()):
                            self._fail_all_locked("the batch decoder stopped")
                    self._closed.wait(_POLL_SECONDS)  # get_result does not wait once the manager has stopped
                continue
            try:
                self._deliver(output)
            except Exception as exc:  # this thread never dies: every reply in the batch would then wait forever
                log.exception("handing out a batched output failed")
                self._end(output.request_id, exc)

    def _deliver(self, output) -> None:
        with self._lock:
            request = self._requests.get(output.request_id)
        if request is None:
            return  # cancelled, or failed already
        request.stream.put(output.generated_tokens[request.delivered :])
        request.delivered = len(output.generated_tokens)
        if output.is_finished():
            failure = None
            if output.error is not None:
                log.error("batched generation failed: %s", output.error)
                cleared = True
                try:
                    gpu.clear_cache()
                except Exception:  # a sticky CUDA error raises again here: the reply still ends with its own error
                    log.exception("releasing the CUDA cache after the failed batch step failed")
                    cleared = False
                failure = GenerationError(_describe_batch_error(output.error, cleared))
            self._end(output.request_id, failure)
        elif request.should_stop():
            self.cancel(output.request_id)


def manager_configs(
    model: torch.nn.Module, *, stop_ids: list[int], pad_token_id: int, slots: int, cache_tokens: int, page_size: int
) -> tuple[GenerationConfig, ContinuousBatchingConfig]:
    """The generation and batching configs of a `BatchDecoder`'s manager: `slots` replies at most, a paged KV cache of
    `cache_tokens` tokens in pages of `page_size`. (benchmarks/concurrency_gain.py builds a manager from them too, to
    time the library without the engine.)"""
    # The sampling values only make transformers create the per-request temperature, top-k and top-p processors;
    # every request passes its own (`request_sampling`).
    config = GenerationConfig(
        do_sample=True, temperature=0.5, top_p=0.5, top_k=2, eos_token_id=list(stop_ids), pad_token_id=pad_token_id
    )
    cb_config = ContinuousBatchingConfig(
        page_size=page_size,
        num_blocks=max(2, cache_tokens // page_size),
        max_batch_tokens=min(2048, cache_tokens) if model.device.type == "cuda" else min(512, cache_tokens),
        max_requests_per_batch=slots,
        per_request_processors=True,
        drop_unsupported_processors=False,
        auto_switch_to_flash=False,  # the one-reply path shares the model and its sdpa attention
        allow_block_sharing=True,
    )
    return config, cb_config


def request_sampling(params: SamplingParams, vocab_size: int) -> dict[str, float | int]:
    """The per-request sampling arguments of `add_request` for `params`; greedy is top-k 1 (see the module's note)."""
    if params.greedy:
        return {"temperature": 1.0, "top_p": 1.0, "top_k": 1}
    top_k = params.top_k if params.top_k > 0 else vocab_size
    return {"temperature": float(params.temperature), "top_p": float(params.top_p), "top_k": int(top_k)}


def _describe_batch_error(error: str, cleared: bool) -> str:
    if "out of memory" in error.lower():
        cache = "The cache was cleared" if cleared else "Releasing the cache failed too (see the server log)"
        return (
            f"GPU out of memory in the batch: {error}. {cache}; try fewer max new tokens, a shorter conversation or a "
            "smaller INTERNLM_MAX_BATCH_SIZE."
        )
    return f"batched generation failed: {error}"
