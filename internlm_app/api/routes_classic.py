"""The InternLM FastAPI tutorial's contract: `POST /` with {"prompt": ...} answers {"response", "status", "time"}."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from internlm_app.api.errors import now_text
from internlm_app.api.openai_common import DROPPED_HEADER
from internlm_app.api.replies import ReplyRunner
from internlm_app.api.schemas import ClassicRequest
from internlm_app.chat_types import ReplyOptions

router = APIRouter(tags=["classic"])

_BODY_SCHEMA = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": ClassicRequest.model_json_schema()}}}
}


async def _read_classic_request(request: Request) -> ClassicRequest:
    """Parse the body as JSON whatever its Content-Type (curl -d without -H works too)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if isinstance(exc, json.JSONDecodeError):
            reason = exc.msg
        elif isinstance(exc, UnicodeDecodeError):
            reason = "not UTF-8"
        elif isinstance(exc, RecursionError):
            reason = "nested too deeply"
        else:  # e.g. an integer longer than Python converts (sys.get_int_max_str_digits())
            reason = str(exc)
        position = getattr(exc, "pos", getattr(exc, "start", 0))
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body", position), "ctx": {"error": reason}}]
        ) from None
    try:
        return ClassicRequest.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


@router.post("/", summary="Chat (classic tutorial contract)", openapi_extra=_BODY_SCHEMA)
async def classic_chat(request: Request, response: Response) -> dict:
    """Reply to `prompt` (with optional history/system/sampling); errors mirror the HTTP code in `status`.

    History is kept whole while the prompt fits (the reply is capped to the room left instead); turns left out
    because the prompt itself did not fit are counted in `dropped_messages` and the X-Dropped-Messages header.
    """
    body = await _read_classic_request(request)
    settings = request.app.state.settings
    messages = body.messages(settings.system_prompt)
    options = ReplyOptions(keep_history=True)
    runner = ReplyRunner(request, messages, body.sampling(settings, body.max_new_tokens), options)
    text = await runner.text()
    history = [[user, assistant] for user, assistant in body.history or []] + [[body.prompt, text]]
    result = {"response": text, "history": history, "status": 200, "time": now_text()}
    if dropped := runner.stats.dropped_messages:
        result["dropped_messages"] = dropped
        response.headers[DROPPED_HEADER] = str(dropped)
    return result


@router.get("/", summary="How to call the classic endpoint")
async def classic_help(request: Request) -> dict:
    """Explain the POST contract instead of answering 405."""
    base = str(request.base_url).rstrip("/")
    return {
        "message": "POST a JSON body to this URL to chat; the reply is in 'response'.",
        "example_request": {"prompt": "你好", "history": [["user turn", "assistant turn"]], "temperature": 0.8},
        "example_response": {"response": "...", "history": [["你好", "..."]], "status": 200, "time": now_text()},
        "curl": f"curl -X POST {base} -H 'Content-Type: application/json' -d '{{\"prompt\": \"你好\"}}'",
        "fields": {name: field.description for name, field in ClassicRequest.model_fields.items() if field.description},
        "openai_compatible": f"{base}/v1/chat/completions",
        "docs": f"{base}/docs",
        "status": 200,
        "time": now_text(),
    }
