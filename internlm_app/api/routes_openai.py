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


class StopFilter:
    """Cuts the reply at the first stop string; while streaming, holds back text that may be the start of one."""

    def __init__(self, stops: list[str] | None):
        self.stops = stops or []
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        found = [i for i in (self.pending.find(stop) for stop in self.stops) if i >= 0]
        if found:
            self.hit = True
            text, self.pending = self.pending[: min(found)], ""
            return text
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - keep
        text, self.pending = self.pending[:cut], self.pending[cut:]
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
