"""JSON error bodies for every 4xx/5xx: OpenAI-style under /v1, the classic `status`/`error` shape elsewhere."""

from __future__ import annotations

import logging
import re
from datetime import datetime

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from internlm_app.chat_types import (
    ContextTooLongError,
    EngineError,
    GenerationError,
    InvalidRequestError,
    QueueFullError,
)

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 5
_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    422: "invalid_request",
    500: "internal_error",
}


def now_text() -> str:
    """Local time as the tutorial's clients expect it: YYYY-mm-dd HH:MM:SS."""
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def openai_error(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code or _CODES.get(status)}}


def error_response(
    path: str,
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The error body for `path`'s family of routes."""
    if is_openai_path(path):
        body = openai_error(status, message, code, param)
    else:
        body = {"response": None, "status": status, "error": message, "time": now_text()}
    return JSONResponse(body, status_code=status, headers=headers)


def _union_member(part: object) -> bool:
    """Whether a location part is pydantic's tag for a member of a union ("str", "list[str]", "NamedToolChoice",
    "function-after[_unicode(), str]"), not a field name or an index: fields here are snake_case."""
    return isinstance(part, str) and bool(_UNION_MEMBER.fullmatch(part))


_UNION_MEMBER = re.compile(r"[a-z-]+\[.*\]|str|int|float|bool|bytes|none|[A-Z]\w*")


def describe_validation_errors(errors: list[dict]) -> tuple[str, str | None]:
    """A readable message for pydantic/FastAPI errors, and the first offending field (a dotted path, without the
    union members pydantic names in its locations)."""
    parts: list[str] = []
    first = None
    for error in errors:
        loc = [str(p) for p in error.get("loc", ()) if p != "body" and not _union_member(p)]
        where = ".".join(loc)
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "")
            parts.append(f"the body is not valid JSON ({reason}, at character {loc[0] if loc else '?'})")
            continue
        if not loc and error.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            parts.append("the body must be a JSON object, sent with Content-Type: application/json")
            continue
        first = first or where or None
        msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if error.get("type") == "extra_forbidden":  # pydantic's "Extra inputs are not permitted"
            msg = "not a field this server knows (it would be ignored, so the request is refused)"
        part = f"{where}: {msg}" if where else msg
        if part not in parts:
            parts.append(part)
    return "; ".join(parts) or "invalid request", first


def engine_error_details(
    exc: EngineError, prompt_field: str = "messages"
) -> tuple[str | None, str | None, dict[str, str] | None]:
    """The OpenAI `code` and `param` of an engine error, and the headers its response carries; `prompt_field` is
    the request's field a prompt over the context window is blamed on."""
    if isinstance(exc, QueueFullError):
        return "model_busy", None, {"Retry-After": str(RETRY_AFTER_SECONDS)}
    if isinstance(exc, ContextTooLongError):
        return "context_length_exceeded", prompt_field, None
    if isinstance(exc, GenerationError):
        return "generation_failed", None, None
    if isinstance(exc, InvalidRequestError):
        return None, exc.param, None
    return None, None, None


def engine_error_response(path: str, exc: EngineError) -> JSONResponse:
    code, param, headers = engine_error_details(exc, "prompt" if path.startswith("/v1/completions") else "messages")
    return error_response(path, exc.status, str(exc), code=code, param=param, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every error into a JSON body."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI answers an invalid field with 400 invalid_request_error; the classic route keeps FastAPI's 422.
        message, param = describe_validation_errors(list(exc.errors()))
        status = 400 if is_openai_path(request.url.path) else 422
        return error_response(request.url.path, status, message, param=param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; GET / and /docs explain the API"
        return error_response(request.url.path, exc.status_code, message, headers=exc.headers)

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError) -> JSONResponse:
        return engine_error_response(request.url.path, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request.url.path, 500, f"internal server error: {type(exc).__name__}")
