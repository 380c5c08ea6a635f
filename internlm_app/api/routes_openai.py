"""OpenAI-compatible chat routes: `POST /v1/chat/completions` (plain and server-sent events), `GET /v1/models[/id]`.

Bodies are the `openai` package's own types (ChatCompletion, ChatCompletionChunk), validated before they are sent.
A streamed reply's plain content chunks differ only in their text: their shape is validated once per choice.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing

from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from internlm_app.api.errors import error_response
from internlm_app.api.openai_common import (
    ResponseIds,
    close_all,
    dropped_headers,
    dropped_messages,
    event_stream,
    logprob_entry,
    seeds,
    start_runners,
    usage,
)
from internlm_app.api.openai_requests import ChatCompletionRequest
from internlm_app.api.replies import ReplyRunner
from internlm_app.chat.reply_reader import ChoiceBuilder, Delta
from internlm_app.chat_types import ToolCall

router = APIRouter(prefix="/v1", tags=["openai"])


def _tool_calls(call: ToolCall, *, streamed: bool) -> list[dict]:
    entry = {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
    return [{"index": 0, **entry}] if streamed else [entry]


def _logprobs(delta: Delta, wanted: bool) -> dict | None:
    return {"content": [logprob_entry(r) for r in delta.logprobs], "refusal": None} if wanted else None


def _builder(body: ChatCompletionRequest) -> ChoiceBuilder:
    tools = [t.function.name for t in body.tools or []]
    strict = {t.function.name: t.function.parameters or {} for t in body.tools or [] if t.function.strict}
    return ChoiceBuilder(body.stop, forced_call=body.forced_tool is not None, tools=tools, strict=strict)


async def _whole_choice(index: int, runner: ReplyRunner, body: ChatCompletionRequest) -> dict:
    builder, total = _builder(body), Delta()
    async with aclosing(runner.chunks()) as chunks:
        async for chunk in chunks:
            delta = builder.push(chunk)
            total.content += delta.content
            total.logprobs += delta.logprobs
            if builder.ended:
                runner.finish_reason = "stop"
                break
    rest, finish = builder.finish(runner.finish_reason or runner.stats.finish_reason)
    total.content += rest.content
    total.logprobs += rest.logprobs
    message: dict = {"role": "assistant", "content": total.content or None}
    if builder.tool_call is not None:
        message["tool_calls"] = _tool_calls(builder.tool_call, streamed=False)
    else:
        message["content"] = total.content
    return {"index": index, "message": message, "logprobs": _logprobs(total, body.logprobs), "finish_reason": finish}


def _chunk(ids: ResponseIds, choices: list[dict], body: ChatCompletionRequest, **extra) -> dict:
    data = {
        "id": ids.id,
        "object": "chat.completion.chunk",
        "created": ids.created,
        "model": ids.model,
        "choices": choices,
        **extra,
    }
    if body.include_usage and "usage" not in data:
        data["usage"] = None
    return ChatCompletionChunk.model_validate(data).model_dump(mode="json", exclude_unset=True)


class _ContentChunks:
    """The JSON of one choice's plain content chunks (text only: no logprobs, tool call or finish reason).

    The chunk is validated and dumped once, as a ChatCompletionChunk, with a marker for its text; each chunk then costs
    one `json.dumps` of its text instead of a validation, a dump and a dump of the whole object (about 0.1 ms of
    event-loop CPU a chunk, which holds the GIL the generation thread needs).
    """

    _MARKER = "\x00content\x00"  # no id, model name or field of a chunk holds a NUL

    def __init__(self, index: int, ids: ResponseIds, body: ChatCompletionRequest):
        choice = {"index": index, "delta": {"content": self._MARKER}, "logprobs": None, "finish_reason": None}
        template = json.dumps(_chunk(ids, [choice], body), ensure_ascii=False)
        self._head, self._tail = template.split(json.dumps(self._MARKER))

    def __call__(self, text: str) -> str:
        return self._head + json.dumps(text, ensure_ascii=False) + self._tail


async def _choice_events(
    index: int, runner: ReplyRunner, body: ChatCompletionRequest, ids: ResponseIds
) -> AsyncIterator[dict | str]:
    content_chunk = _ContentChunks(index, ids, body)

    def event(delta: Delta, finish: str | None = None) -> dict | str:
        if delta.content and delta.tool_call is None and finish is None and not body.logprobs:
            return content_chunk(delta.content)
        fields: dict = {}
        if delta.content:
            fields["content"] = delta.content
        if delta.tool_call is not None:
            fields["tool_calls"] = _tool_calls(delta.tool_call, streamed=True)
        choice = {"index": index, "delta": fields, "logprobs": _logprobs(delta, body.logprobs), "finish_reason": finish}
        return _chunk(ids, [choice], body)

    builder = _builder(body)
    yield _chunk(ids, [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}], body)
    async with aclosing(runner.chunks()) as chunks:
        async for chunk in chunks:
            if delta := builder.push(chunk):
                yield event(delta)
            if builder.ended:
                runner.finish_reason = "stop"
                break
    rest, finish = builder.finish(runner.finish_reason or runner.stats.finish_reason)
    yield event(rest, finish)


@router.post("/chat/completions", summary="Chat completion (OpenAI-compatible)")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """Reply to the messages, as one JSON object or as server-sent events ending in `data: [DONE]`.

    With `tools`, a reply may be a call in InternLM2's format, returned as `tool_calls`; `tool_choice` required or
    named constrains decoding to a valid call, and `response_format` to JSON (valid against its schema).
    """
    settings, backend = request.app.state.settings, request.app.state.backend
    await to_thread.run_sync(body.check_schemas)  # seconds for a large schema: never on the event loop
    body.refuse_unsupported()
    request.state.end_user = body.user
    params = body.sampling(settings, body.max_new_tokens)
    messages = body.chat_messages(settings.system_prompt)
    seed_of = seeds(body.seed)
    runners = await start_runners(request, [messages] * body.n, params, lambda i: body.reply_options(seed_of(i)))
    ids = ResponseIds("chatcmpl", backend.info.name)
    dropped = dropped_messages(runners)
    extra = {"dropped_messages": dropped} if dropped else {}
    if body.stream:

        async def events() -> AsyncIterator[dict | str]:
            for index, runner in enumerate(runners):
                async for event in _choice_events(index, runner, body, ids):
                    yield event
            if body.include_usage:
                yield _chunk(ids, [], body, usage=usage(runners, body.n), **extra)

        return event_stream(runners, events())
    try:
        choices = [await _whole_choice(i, runner, body) for i, runner in enumerate(runners)]
    finally:
        await close_all(runners)
    response = ChatCompletion.model_validate(
        {
            "id": ids.id,
            "object": "chat.completion",
            "created": ids.created,
            "model": ids.model,
            "choices": choices,
            "usage": usage(runners, body.n),
            **extra,
        }
    )
    return JSONResponse(response.model_dump(mode="json", exclude_unset=True), headers=dropped_headers(runners))


def _model_card(request: Request) -> dict:
    info = request.app.state.backend.info
    created = int(request.app.state.started_at)
    return {"id": info.name, "object": "model", "created": created, "owned_by": "internlm"}


@router.get("/models", summary="The served model")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_model_card(request)]}


@router.get("/models/{model_id:path}", summary="One model")
async def get_model(model_id: str, request: Request):
    card = _model_card(request)
    if model_id != card["id"]:
        return error_response(
            request.url.path,
            404,
            f"the model {model_id!r} does not exist; this server serves {card['id']!r}",
            code="model_not_found",
            param="model",
        )
    return card
