"""OpenAI-compatible routes: `POST /v1/chat/completions` (plain and server-sent events) and `GET /v1/models`."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from ..chat_types import EngineError, ReplyStats
from .errors import engine_error_details, openai_error
from .replies import ReplyRunner
from .schemas import ChatCompletionRequest

router = APIRouter(prefix="/v1", tags=["openai"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _prefix_function(pattern: str) -> list[int]:
    """Knuth-Morris-Pratt failure table: for each prefix, the length of its longest proper prefix that is a suffix."""
    table, k = [0] * len(pattern), 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = table[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        table[i] = k
    return table


class StopFilter:
    """Cuts the reply at the first stop string; while streaming, holds back text that may be the start of one.

    Each stop string has a Knuth-Morris-Pratt automaton fed only the new text, so a chunk costs O(its length × the
    number of stops), amortised, whatever the stops' lengths (a chunk is checked on the server's event loop). At the
    first character where a stop string completes, the reply is cut at its start (the earliest start, should several
    complete there).
    """

    def __init__(self, stops: list[str] | None):
        self.stops = stops or []
        self._tables = [_prefix_function(stop) for stop in self.stops]
        self._matched = [0] * len(self.stops)  # per stop: how many of its first characters end the text so far
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        if self.hit:
            return ""
        base = len(self.pending)
        self.pending += text
        for offset, char in enumerate(text):
            cut = None
            for i, stop in enumerate(self.stops):
                matched, table = self._matched[i], self._tables[i]
                while matched and stop[matched] != char:
                    matched = table[matched - 1]
                if stop[matched] == char:
                    matched += 1
                if matched == len(stop):
                    start = base + offset + 1 - len(stop)
                    cut = start if cut is None else min(cut, start)
                    matched = table[matched - 1]
                self._matched[i] = matched
            if cut is not None:
                self.hit = True
                text, self.pending = self.pending[:cut], ""
                return text
        keep = len(self.pending) - max(self._matched)  # a stop may still complete over the text held back
        text, self.pending = self.pending[:keep], self.pending[keep:]
        return text

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


@dataclass
class _Completion:
    """Ids and shapes of one chat completion's response objects."""

    model: str
    include_usage: bool = False
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _base(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self, text: str, finish_reason: str, stats: ReplyStats) -> dict:
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        return {**self._base("chat.completion"), "choices": [choice], "usage": _usage(stats)}

    def chunk(self, delta: dict, finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        data = {**self._base("chat.completion.chunk"), "choices": [choice]}
        return sse_event({**data, "usage": None} if self.include_usage else data)

    def usage_chunk(self, stats: ReplyStats) -> str:
        return sse_event({**self._base("chat.completion.chunk"), "choices": [], "usage": _usage(stats)})


def sse_event(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(stats: ReplyStats) -> dict:
    total = stats.prompt_tokens + stats.completion_tokens
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens, "total_tokens": total}


def _finish_reason(runner: ReplyRunner) -> str:
    return "length" if (runner.finish_reason or runner.stats.finish_reason) == "length" else "stop"


async def _reply_text(runner: ReplyRunner, stops: StopFilter) -> AsyncIterator[str]:
    """The runner's chunks cut at the first stop string, which also ends generation."""
    async with aclosing(runner.chunks()) as chunks:
        async for chunk in chunks:
            if text := stops.push(chunk):
                yield text
            if stops.hit:
                runner.finish_reason = "stop"
                return
    if tail := stops.flush():
        yield tail


async def _events(runner: ReplyRunner, stops: StopFilter, completion: _Completion) -> AsyncIterator[str]:
    yield completion.chunk({"role": "assistant", "content": ""})
    try:
        async with aclosing(_reply_text(runner, stops)) as texts:
            async for text in texts:
                yield completion.chunk({"content": text})
    except EngineError as exc:  # e.g. out of memory after the first token: the status line is already sent
        code, param, _ = engine_error_details(exc)
        yield sse_event(openai_error(exc.status, str(exc), code, param))
        yield sse_event("[DONE]")
        return
    yield completion.chunk({}, _finish_reason(runner))
    if completion.include_usage:
        yield completion.usage_chunk(runner.stats)
    yield sse_event("[DONE]")


@router.post("/chat/completions", summary="Chat completion (OpenAI-compatible)")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """Reply to the messages, as one JSON object or as server-sent events ending in `data: [DONE]`."""
    settings, backend = request.app.state.settings, request.app.state.backend
    params = body.sampling(settings, body.max_new_tokens)
    runner = ReplyRunner(request, body.chat_messages(settings.system_prompt), params)
    completion = _Completion(model=backend.info.name, include_usage=body.include_usage)
    stops = StopFilter(body.stop)
    await runner.start()  # queue-full, context and early generation errors still get their HTTP status
    if body.stream:
        events = _events(runner, stops, completion)
        return StreamingResponse(
            events, media_type="text/event-stream", headers=SSE_HEADERS, background=BackgroundTask(runner.close)
        )
    async with aclosing(_reply_text(runner, stops)) as texts:
        text = "".join([t async for t in texts])
    return completion.response(text, _finish_reason(runner), runner.stats)


@router.get("/models", summary="The served model")
async def list_models(request: Request) -> dict:
    info = request.app.state.backend.info
    created = int(request.app.state.started_at)
    model = {"id": info.name, "object": "model", "created": created, "owned_by": "internlm"}
    return {"object": "list", "data": [model]}
