"""A chat backend on a remote OpenAI-compatible server (LMDeploy, vLLM, this app's API): the engine's seam."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator

import httpx2
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


def engine_error(exc: openai.OpenAIError | httpx2.HTTPError, base_url: str) -> EngineError:
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


# How often the watcher of a streamed reply checks that the reply is still going (a cancel is noticed at once).
_WATCH_SECONDS = 0.1
# httpcore's trace events of a new connection ("connection.", "proxy." or "socks." first), whose stream has the socket.
_CONNECTED = (".connect_tcp.complete", ".connect_unix_socket.complete", ".start_tls.complete")
_requests = threading.local()  # .abort: the _Abort of the request the current thread is about to send


class _Abort:
    """Ends one HTTP request from another thread, also while the request blocks in a read (e.g. while queued).

    Closing the openai stream from another thread does not wake a thread blocked in recv() on the socket (and the
    response headers, so the stream object, come only once the server starts the reply); shutting the socket down
    does: the read returns at once with end-of-stream. The request's sockets are noted through httpcore's `trace`
    extension when its connection is made (the client keeps no idle connection, so each request makes one).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._ended = False
        self.aborted = False

    def trace(self, event: str, info: dict) -> None:
        if not event.endswith(_CONNECTED):
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(sock, socket.socket):
            with self._lock:
                self._sockets.append(sock)
                if self.aborted and not self._ended:  # aborted while connecting
                    _shut(sock)

    def abort(self) -> None:
        with self._lock:
            if self._ended or self.aborted:
                return
            self.aborted = True
            for sock in self._sockets:
                _shut(sock)

    def end(self) -> None:
        """The request is over (its sockets may close and their numbers be reused): abort() does nothing from now."""
        with self._lock:
            self._ended = True


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's: an SSLSocket's drops its TLS state


def _attach_abort(request: httpx2.Request) -> None:
    """httpx request hook: hands httpcore the trace callback of the request being sent from this thread."""
    abort = getattr(_requests, "abort", None)
    if abort is not None:
        request.extensions["trace"] = abort.trace


def _watch(cancel: threading.Event, done: threading.Event, abort: _Abort) -> None:
    """Body of a streamed reply's watcher thread: aborts the request when `cancel` is set before `done`."""
    while not done.is_set():
        if cancel.wait(_WATCH_SECONDS):
            if not done.is_set():
                abort.abort()
            return


def _http_client() -> httpx2.Client:
    """The openai client's default HTTP client with no idle connections kept, and the hook _Abort relies on."""
    return openai.DefaultHttpxClient(
        limits=httpx2.Limits(max_connections=1000, max_keepalive_connections=0),
        event_hooks={"request": [_attach_abort]},
    )


class RemoteBackend:
    """Streams replies from `settings.openai_base_url` with the official openai client; no model is loaded here."""

    def __init__(self, settings: Settings, client: openai.OpenAI | None = None):
        self.settings = settings
        self.client = client or openai.OpenAI(
            base_url=settings.openai_base_url,
            api_key=settings.openai_api_key.get_secret_value(),
            max_retries=0,
            http_client=_http_client(),
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
        self.model = settings.openai_model  # the name sent with each request

    def discover_model(self, timeout: float = 5.0) -> None:
        """Ask the server's `/v1/models` what it serves, so the UI shows that and requests name it.

        The configured INTERNLM_OPENAI_MODEL is kept when the server lists it; otherwise the server's first model
        is used (servers refuse a name they do not serve) and a warning says so. An unreachable server leaves the
        configured name: replies will report the connection error themselves.
        """
        try:
            served = [m.id for m in self.client.with_options(timeout=timeout).models.list()]
        except (openai.OpenAIError, httpx2.HTTPError) as exc:
            log.warning("could not list the models of %s: %s", self.settings.openai_base_url, exc)
            return
        self.info.extra["served_models"] = served
        if served and self.model not in served:
            log.warning(
                "%s does not serve %r; using %r, which it does", self.settings.openai_base_url, self.model, served[0]
            )
            self.model = served[0]
        self.info.name = self.model

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
            "model": self.model,
            "messages": messages,
            "temperature": 0.0 if params.greedy else params.temperature,
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
        stream, abort, done = None, _Abort(), threading.Event()
        if cancel is not None:  # a cancel ends the request at once, also while it waits for the server's reply
            watcher = threading.Thread(
                target=_watch, args=(cancel, done, abort), name="internlm-remote-cancel", daemon=True
            )
            watcher.start()
        try:
            if cancel is not None and cancel.is_set():
                return
            _requests.abort = abort
            try:
                stream = self.client.chat.completions.create(**request)
            finally:
                _requests.abort = None
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
        except (openai.OpenAIError, httpx2.HTTPError) as exc:
            if not abort.aborted:  # else: the read ended by the cancel's abort, a cancel and no error
                stats.finish_reason = "error"
                error = engine_error(exc, self.settings.openai_base_url)
                stats.error = str(error)
                raise error from exc
        finally:
            done.set()  # the watcher ends
            abort.end()
            if stream is not None:
                with contextlib.suppress(httpx2.HTTPError):  # a connection the abort shut down
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
