"""The GPU queue survives a failure while the cache is being released (e.g. a sticky CUDA error)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from internlm_app.backends.engine import ChatEngine
from internlm_app.chat_types import GenerationError, ReplyEvents
from internlm_app.runtime import gpu
from internlm_app.sampling import SamplingParams

GREEDY = SamplingParams.greedy_params(8)


def _failing_clear_cache():
    raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")


@pytest.mark.parametrize("forward_fails", [True, False])
def test_failing_cache_release_is_reported_and_frees_the_queue(engine, monkeypatch, forward_fails):
    settings = engine.settings.model_copy(update={"empty_cache_after_reply": True})
    subject = ChatEngine(engine.model, engine.tokenizer, dataclasses.replace(engine.info), settings)
    monkeypatch.setattr(gpu, "clear_cache", _failing_clear_cache)

    def fail(module, args, output):
        raise torch.OutOfMemoryError("CUDA out of memory")

    handle = engine.model.register_forward_hook(fail) if forward_fails else None
    events = ReplyEvents()
    try:
        with pytest.raises(GenerationError, match="out of memory" if forward_fails else "illegal memory access"):
            list(subject.stream_reply([{"role": "user", "content": "hi"}], GREEDY, events=events))
    finally:
        if handle is not None:
            handle.remove()
    assert events.stats.finish_reason == "error"
    assert subject.queue.active == 0
    monkeypatch.undo()
    text, stats = subject.reply([{"role": "user", "content": "hi"}], GREEDY)
    assert stats.finish_reason in {"stop", "length"}
