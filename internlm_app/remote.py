"""A chat backend on a remote OpenAI-compatible server (LMDeploy, vLLM, this app's API): the engine's seam."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator

import openai

from .chat_types import (
    ContextTooLongError,
    EngineError,
    GenerationError,
    InvalidRequestError,
    Message,
    QueueFullError,
    ReplyEvents,
)
from .loader import ModelInfo
from .prompt import validate_messages
from .sampling import SamplingParams
from .settings import Settings

log = logging.getLogger(__name__)

# "needs N tokens ... budget is M" (this app's API), "maximum context length is M tokens ... N" (vLLM, OpenAI).
_OURS = re.compile(r"needs (\d+) tokens.*?budget is (\d+)", re.S)
_VLLM = re.compile(r"maximum context length is (\d+) tokens\D+(\d+)", re.S)


def _error_message(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return exc.message


def engine_error(exc: openai.OpenAIError, base_url: str) -> EngineError:
    """The EngineError subclass (and so the HTTP status) that stands for an error of the remote server."""
    if isinstance(exc, openai.APIConnectionError):  # also timeouts
        return GenerationError(f"cannot reach the model server at {base_url}: {exc}")
    if not isinstance(exc, openai.APIError):
        return GenerationError(f"{type(exc).__name__}: {exc}")
    message = _error_message(exc)
    status = exc.status_code if isinstance(exc, openai.APIStatusError) else None
    if status in (400, 413, 422):
        if match := _OURS.search(message):
            return ContextTooLongError(int(match[1]), int(match[2]))
        if match := _VLLM.search(message):
            return ContextTooLongError(int(match[2]), int(match[1]))
        return InvalidRequestError(message)
    if status == 429 or (status == 503 and exc.code == "model_busy"):
        return QueueFullError(message)
    if status in (401, 403):
        return GenerationError(f"the model server refused the key (INTERNLM_OPENAI_API_KEY): {message}")
    if status == 404:
        return GenerationError(f"not found on {base_url} (check INTERNLM_OPENAI_BASE_URL/_MODEL): {message}")
    return GenerationError(message)


class RemoteBackend:
    """Streams replies from `settings.openai_base_url` with the official openai client; no model is loaded here."""

    def __init__(self, settings: Settings, client: openai.OpenAI | None = None):
        self.settings = settings
        self.client = client or openai.OpenAI(
            base_url=settings.openai_base_url, api_key=settings.openai_api_key.get_secret_value(), max_retries=0
        )
        self.info = ModelInfo(
            name=settings.openai_model,
            path=settings.openai_base_url,
            dtype="remote",
            device="remote",
            device_map=None,
            quantization="remote",
            attn_implementation="remote",
            context_window=settings.max_length,
            extra={"backend": "openai", "base_url": settings.openai_base_url},
        )
        self.queue = None  # the server queues requests itself

    @property
    def context_window(self) -> int:
        return self.info.context_window

    def stream_reply(
        self,
        messages: list[Message],
        params: SamplingParams,
        *,
        cancel: threading.Event | None = None,
        events: ReplyEvents | None = None,
        max_length: int | None = None,
    ) -> Iterator[str]:
        """Yield reply text from the server; the messages are checked here, the request is sent on the first next().

        Setting `cancel` or closing the iterator closes the HTTP stream, which stops generation on the server.
        `max_length` is accepted for the seam's sake: the server applies its own context limit.
        """
        validate_messages(messages)
        if not messages or messages[-1]["role"] != "user":
            raise InvalidRequestError("the conversation must end with a user message")
        if messages[0]["role"] != "system":  # say "no system prompt" explicitly: some servers add a default one
            messages = [{"role": "system", "content": ""}, *messages]
        extra: dict = {"repetition_penalty": params.repetition_penalty}  # extensions of vLLM, LMDeploy and this API
        if params.top_k:  # 0 (off) is left out: vLLM 0.8 refuses it (it wants -1)
            extra["top_k"] = params.top_k
        request = {
            "model": self.settings.openai_model,
            "messages": messages,
            "temperature": params.temperature,
            "top_p": 1.0 if params.greedy else params.top_p,
            "max_tokens": params.max_new_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "extra_body": extra,
        }
        return self._stream(request, cancel, events or ReplyEvents())

    def _stream(self, request: dict, cancel: threading.Event | None, events: ReplyEvents) -> Iterator[str]:
        stats = events.stats
        started = time.perf_counter()
        count, first_at, finish, usage, ended_normally = 0, None, None, None, False
        stream = None
        try:
            stream = self.client.chat.completions.create(**request)
            for chunk in stream:
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    finish = choice.finish_reason or finish
                    if text := (choice.delta.content if choice.delta else None):
                        count += 1
                        first_at = first_at or time.perf_counter()
                        yield text
                if cancel is not None and cancel.is_set():
                    break
            else:
                ended_normally = True
        except openai.OpenAIError as exc:
            stats.finish_reason = "error"
            error = engine_error(exc, self.settings.openai_base_url)
            stats.error = str(error)
            raise error from exc
        finally:
            if stream is not None:
                stream.close()
            ended = time.perf_counter()
            stats.total_seconds = ended - started
            stats.prompt_tokens = usage.prompt_tokens if usage else 0
            stats.completion_tokens = usage.completion_tokens if usage else count
            if first_at is not None:
                stats.time_to_first_token = first_at - started
                if stats.completion_tokens > 1 and ended > first_at:
                    stats.tokens_per_second = (stats.completion_tokens - 1) / (ended - first_at)
            if stats.finish_reason != "error":
                stats.finish_reason = ("length" if finish == "length" else "stop") if ended_normally else "cancelled"
