"""`POST /v1/completions`: text completion of a raw prompt (no chat template), plain and server-sent events.

Bodies are the `openai` package's `Completion` type. Logprobs take the legacy completions shape (tokens,
token_logprobs, top_logprobs as {token: logprob}, text_offset).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from openai.types import Completion

from internlm_app.api.openai_common import (
    ResponseIds,
    close_all,
    dropped_headers,
    event_stream,
    seeds,
    start_runners,
    usage,
)
from internlm_app.api.openai_requests import COMPLETIONS_DEFAULT_MAX_TOKENS, CompletionRequest
from internlm_app.api.replies import ReplyRunner
from internlm_app.chat.reply_reader import StopCutText
from internlm_app.chat_types import TokenLogprob

router = APIRouter(prefix="/v1", tags=["openai"])


class _Logprobs:
    """The legacy logprobs of one choice, with each token's offset in the choice's text."""

    def __init__(self) -> None:
        self.offset = 0

    def shape(self, records: list[TokenLogprob]) -> dict:
        tokens, offsets = [], []
        for record in records:
            tokens.append(record.token)
            offsets.append(self.offset)
            self.offset += len(record.token)
        return {
            "tokens": tokens,
            "token_logprobs": [r.logprob for r in records],
            "top_logprobs": [{text: value for text, _, value in r.top} for r in records],
            "text_offset": offsets,
        }


async def _pieces(runner: ReplyRunner, stops: StopCutText) -> AsyncIterator[tuple[str, list[TokenLogprob]]]:
    """The reply's text cut at the first stop string, with the logprobs of the tokens whose text each piece sent."""
    async with aclosing(runner.chunks()) as chunks:
        async for chunk in chunks:
            text, records = stops.push(chunk.text, chunk.logprobs)
            if text or records:
                yield text, records
            if stops.hit:
                runner.finish_reason = "stop"
                return
    text, records = stops.flush()
    if text or records:
        yield text, records


def _finish(runner: ReplyRunner) -> str:
    return "length" if (runner.finish_reason or runner.stats.finish_reason) == "length" else "stop"


def _completion(ids: ResponseIds, choices: list[dict], **extra) -> dict:
    data = {"id": ids.id, "object": "text_completion", "created": ids.created, "model": ids.model, "choices": choices}
    data.update(extra)
    if any(choice["finish_reason"] is None for choice in choices):
        # A streamed piece before the end: OpenAI sends finish_reason null, which the Completion type (made for
        # whole responses) does not allow; the openai client reads such chunks without validating them either.
        return Completion.model_construct(**data).model_dump(mode="json", exclude_unset=True, warnings=False)
    return Completion.model_validate(data).model_dump(mode="json", exclude_unset=True)


@router.post("/completions", summary="Text completion (OpenAI-compatible)")
async def completions(body: CompletionRequest, request: Request):
    """Continue each prompt as raw text; `n` choices per prompt, choice i of prompt p at index p × n + i."""
    settings, backend = request.app.state.settings, request.app.state.backend
    body.refuse_unsupported()
    request.state.end_user = body.user
    params = body.sampling(settings, body.max_tokens, default_max=COMPLETIONS_DEFAULT_MAX_TOKENS)
    prompts = [[{"role": "user", "content": p}] for p in body.prompts for _ in range(body.n)]
    seed_of = seeds(body.seed)
    runners = await start_runners(request, prompts, params, lambda i: body.reply_options(seed_of(i % body.n)))
    ids = ResponseIds("cmpl", backend.info.name)
    wanted = body.logprobs is not None
    if body.stream:

        async def events() -> AsyncIterator[dict]:
            for index, runner in enumerate(runners):
                logprobs = _Logprobs()
                async for text, records in _pieces(runner, StopCutText(body.stop)):
                    lp = logprobs.shape(records) if wanted else None
                    yield _completion(ids, [{"index": index, "text": text, "logprobs": lp, "finish_reason": None}])
                yield _completion(
                    ids, [{"index": index, "text": "", "logprobs": None, "finish_reason": _finish(runner)}]
                )
            if body.include_usage:
                yield _completion(ids, [], usage=usage(runners, body.n))

        return event_stream(runners, events())
    choices = []
    try:
        for index, runner in enumerate(runners):
            text, records = "", []
            async for piece, piece_records in _pieces(runner, StopCutText(body.stop)):
                text, records = text + piece, records + piece_records
            lp = _Logprobs().shape(records) if wanted else None
            choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": _finish(runner)})
    finally:
        await close_all(runners)
    body_out = _completion(ids, choices, usage=usage(runners, body.n))
    return JSONResponse(body_out, headers=dropped_headers(runners))
