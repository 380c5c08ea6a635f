"""Edge cases of the engine on the real tiny model: a failure while recovering from a failure, and close()."""

from __future__ import annotations

import threading

import pytest
import torch

from internlm_app.backends.engine import ChatEngine
from internlm_app.backends.token_stream import TokenStream
from internlm_app.backends.worker import GenerationJob
from internlm_app.chat_types import GenerationError, ReplyEvents
from internlm_app.runtime import gpu
from internlm_app.sampling import SamplingParams
from tests.api_helpers import wait_until
from tests.faults import FailOnForward

HI = [{"role": "user", "content": "hi"}]
GREEDY = SamplingParams.greedy_params(8)
# Greedy with a strong repetition penalty: the tiny model answers "hi" with 245 tokens, on the worker.
LONG = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=2.0, max_new_tokens=400)


def _in_thread(fn, timeout: float = 30.0):
    """fn() in a thread; its result or exception, or TimeoutError when it never returns (a wedged engine)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError("the call never returned")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _raised(fn, *args) -> BaseException | None:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - handed to the test
        return exc
    return None


@pytest.fixture
def subject(engine):
    fresh = ChatEngine(engine.model, engine.tokenizer, engine.info, engine.settings)
    yield fresh
    fresh.close()


def _failing_clear_cache():
    raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")


def test_a_failing_cache_release_after_a_failed_batch_step_never_wedges_the_batch(subject, monkeypatch):
    subject.batch_decoder()
    monkeypatch.setattr(gpu, "clear_cache", _failing_clear_cache)
    handle = subject.model.register_forward_hook(FailOnForward(2))
    try:
        # its own error (not the failed release's), which does not claim the cache was cleared
        with pytest.raises(GenerationError, match="out of memory.*Releasing the cache failed too"):
            _in_thread(lambda: subject._reply_on("batch", HI, GREEDY))
    finally:
        handle.remove()
    monkeypatch.undo()
    text, stats = _in_thread(lambda: subject._reply_on("batch", HI, GREEDY))
    assert stats.finish_reason in {"stop", "length"} and stats.batched
    assert subject.queue.active == 0


def test_a_reply_that_reaches_the_worker_while_it_closes_is_refused_never_left_waiting(engine):
    # close() puts the worker's end in its line and waits for the reply it decodes; a reply that was already past
    # the engine's closed check (waiting for the worker) reaches the worker now. Queued behind the end, it would
    # never run and its caller would wait forever, cancel included.
    settings = engine.settings.model_copy(update={"max_batch_size": 1})
    subject = ChatEngine(engine.model, engine.tokenizer, engine.info, settings)
    release = threading.Event()

    def hold(module, args, output):
        if threading.current_thread() is subject.worker._thread:
            release.wait(30)

    handle = subject.model.register_forward_hook(hook=hold)
    try:
        cut: list[BaseException] = []
        running = threading.Thread(target=lambda: cut.append(_raised(subject._reply_on, "worker", HI, GREEDY)))
        running.start()
        assert wait_until(lambda: subject.queue.active == 1, 10)
        closing = threading.Thread(target=subject.close, daemon=True)
        closing.start()
        assert wait_until(lambda: subject.scheduler.closed, 10)
        stream = TokenStream()
        job = GenerationJob(
            subject.tokenizer.encode_plain("hi"), subject.generation_config(GREEDY), stream, threading.Event()
        )
        with pytest.raises(GenerationError, match="stopped"):
            subject.worker.submit(job)
    finally:
        release.set()
        handle.remove()
    closing.join(30)
    running.join(30)
    assert not closing.is_alive() and not running.is_alive() and not subject.worker.alive
    assert isinstance(cut[0], GenerationError)  # the reply close() cut short


def test_a_reply_cut_short_by_close_ends_with_an_error_never_as_a_whole_reply(engine):
    subject = ChatEngine(engine.model, engine.tokenizer, engine.info, engine.settings)
    events = ReplyEvents()
    stream = subject.stream_reply(HI, LONG, events=events)  # alone: on the worker
    next(stream)
    subject.close()
    with pytest.raises(GenerationError, match="closed"):
        list(stream)
    assert events.stats.finish_reason == "error" and events.stats.completion_tokens < 100
    subject.close()  # again: nothing left to stop
