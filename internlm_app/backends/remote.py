"""A chat backend on a remote OpenAI-compatible server (LMDeploy, vLLM, this app's API): the engine's seam."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import re
import secrets
import threading
import time

import httpx2
import openai

from internlm_app.chat.attachments import estimate_tokens
from internlm_app.chat_types import (
    ContextTooLongError,
    EngineError,
    GenerationError,
    InvalidRequestError,
    Message,
    ModelInfo,
    QueueFullError,
    Reply,
    ReplyChunk,
    ReplyEvents,
    ReplyOptions,
)
from internlm_app.errors import UserFacingError
from internlm_app.runtime.prompt import validate_messages
from internlm_app.sampling import SamplingParams
from internlm_app.settings import ModelSettings

log = logging.getLogger(__name__)

# Every request this process sends to a model server names the process; this app's API refuses (508) a request that
# names its own process, so a base URL that points back at this server fails at once instead of calling itself until
# the server runs out of connections.
VIA_HEADER = "X-InternLM-Chat-Via"
PROCESS_ID = secrets.token_hex(8)
CONNECT_SECONDS = 10.0
HEALTH_CACHE_SECONDS = 5.0  # /health asks the model server at most this often

# "needs N tokens ... budget is M" (this app's API), "maximum context length is M tokens ... N" (vLLM, OpenAI).
_OURS = re.compile(r"needs (\d+) tokens.*?budget is (\d+)", re.S)
# vLLM's and OpenAI's refusals name the window and the prompt's tokens: "maximum context length is 2048 tokens",
# then "your request has 1500 input tokens" / "your prompt contains 1500 input tokens" / "(1500 in the messages".
_WINDOW = re.compile(r"maximum context length is (\d+) tokens")
_PROMPT = re.compile(r"(\d+) input tokens|\((\d+) in the messages")


def window_and_prompt(message: str) -> tuple[int, int] | None:
    """(context window, prompt tokens) from a vLLM / OpenAI "maximum context length" refusal; None for others."""
    window, prompt = _WINDOW.search(message), _PROMPT.search(message)
    if window is None or prompt is None:
        return None
    return int(window[1]), int(prompt[1] or prompt[2])


def _error_message(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return exc.message


class _NoFinish(Exception):
    """The server's 200 reply ended without a finish reason: not an OpenAI chat stream."""

    def __str__(self) -> str:
        return "it ended without a finish reason"


class RemoteSetupError(UserFacingError):
    """INTERNLM_OPENAI_BASE_URL does not lead to an OpenAI-compatible model server (it is this server itself, or
    something that is not that API); the message says which and what to set."""

    reason = "remote_misconfigured"


def engine_error(
    exc: BaseException, base_url: str, *, timeout: float | None = None, started: bool = False
) -> EngineError:
    """The EngineError subclass (and so the HTTP status) that stands for an error of the remote server.

    `timeout` is the read timeout in seconds (named when the server went silent); `started`: part of the reply had
    arrived (a connection that breaks then is not "cannot reach"). Anything that is not an openai or httpx error is a
    reply the client could not read: a malformed stream.
    """
    if isinstance(exc, openai.APITimeoutError):
        waited = f" for {timeout:g} s (INTERNLM_OPENAI_TIMEOUT)" if timeout else ""
        return GenerationError(f"the model server at {base_url} sent nothing{waited}; the request was given up")
    if isinstance(exc, openai.APIConnectionError | httpx2.HTTPError) and started:
        return GenerationError(f"the connection to the model server at {base_url} broke during the reply: {exc}")
    if isinstance(exc, openai.APIConnectionError):
        return GenerationError(f"cannot reach the model server at {base_url}: {exc}")
    if isinstance(exc, httpx2.HTTPError):
        return GenerationError(f"the connection to the model server at {base_url} failed: {exc}")
    if isinstance(exc, _NoFinish) and started:
        return GenerationError(f"the model server at {base_url} stopped sending before the reply's end ({exc})")
    if not isinstance(exc, openai.APIError):
        return GenerationError(
            f"the model server at {base_url} sent a reply that is not an OpenAI-compatible chat stream "
            f"({exc if isinstance(exc, _NoFinish) else f'{type(exc).__name__}: {exc}'})"
        )
    message = _error_message(exc)
    status = exc.status_code if isinstance(exc, openai.APIStatusError) else None
    if status in (400, 413, 422):
        if match := _OURS.search(message):
            return ContextTooLongError(int(match[1]), int(match[2]))
        if sizes := window_and_prompt(message):
            window, prompt = sizes
            if prompt >= window:  # the prompt alone does not fit, as the local engine says it
                return ContextTooLongError(prompt + 1, window)
            return InvalidRequestError(f"max_tokens: {message}", "max_tokens")  # the reply's room was too small
        return InvalidRequestError(message)
    if status == 429 or (status == 503 and exc.code == "model_busy"):
        return QueueFullError(message)
    if status in (401, 403):
        return GenerationError(f"the model server refused the key (INTERNLM_OPENAI_API_KEY): {message}")
    if status == 404:
        return GenerationError(f"not found on {base_url} (check INTERNLM_OPENAI_BASE_URL/_MODEL): {message}")
    if status == 508:
        return GenerationError(message)
    return GenerationError(f"the model server at {base_url} answered {status}: {message}" if status else message)


SELF_LOOP_MESSAGE = (
    "INTERNLM_OPENAI_BASE_URL points at this server itself; set it to the model server's address (LMDeploy's "
    "api_server or vLLM, e.g. http://127.0.0.1:23333/v1)"
)


# How often a streamed reply's task checks its cancel Event (a cancel ends the request within this time).
_WATCH_SECONDS = 0.05
_END = object()  # after the last chunk in a reply's queue


class _EventLoop:
    """One asyncio loop in a daemon thread, where every streamed request of a backend runs as a task.

    A request is cancelled with the public means asyncio offers: `Task.cancel()` interrupts the task wherever it
    awaits, also in the read of a response whose headers have not come yet (a server that queues the request), and
    the openai client closes the connection on the way out, which stops generation on the server.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.active = 0  # requests running now

    def submit(self, coroutine) -> concurrent.futures.Future:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="internlm-remote-loop", daemon=True).start()
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)


def _as_chunks(texts: Reply[str]) -> Reply[ReplyChunk]:
    with contextlib.closing(texts):  # type: ignore[type-var]  # a generator has close()
        for text in texts:
            yield ReplyChunk(text=text)


def _openai_message(message: Message) -> dict:
    """A message as OpenAI's chat API takes it (`speaker` is its `name`). Tool calls and tool results are InternLM2's
    own turns here, which a remote server's template would not read the same: InvalidRequestError."""
    if message["role"] == "environment" or message.get("tool_calls") or message.get("name"):
        raise InvalidRequestError(
            "messages: tool calls and tool results need the local model (INTERNLM_BACKEND=local)", "messages"
        )
    sent = {"role": message["role"], "content": message["content"]}
    if speaker := message.get("speaker"):
        sent["name"] = speaker
    return sent


class RemoteBackend:
    """Streams replies from `settings.openai_base_url` with the official openai client; no model is loaded here."""

    local = False  # the model runs on the server

    def __init__(self, settings: ModelSettings):
        self.settings = settings.model  # the model part of a Settings only
        key = settings.openai_api_key.get_secret_value()
        # The sync client asks what the server serves; replies stream through the async one, as cancellable tasks.
        # The read timeout is the longest silence between two parts of a reply (the wait for the first included).
        url, timeout = settings.openai_base_url, openai.Timeout(settings.openai_timeout, connect=CONNECT_SECONDS)
        via = {VIA_HEADER: PROCESS_ID}
        self.client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=timeout, default_headers=via)
        self.async_client = openai.AsyncOpenAI(
            base_url=url, api_key=key, max_retries=0, timeout=timeout, default_headers=via
        )
        self._loop = _EventLoop()
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
        self._checked: tuple[float, str | None] = (-HEALTH_CACHE_SECONDS, None)  # when `unavailable` asked; answer
        self._discovered = False  # the model name was taken from the server's list
        self.model = settings.openai_model  # the name sent with each request

    def served_models(self, timeout: float = 5.0) -> list[str]:
        """The model names the server's `/v1/models` lists.

        Raises RemoteSetupError when the URL leads back to this server, or to a server that answers but not as an
        OpenAI-compatible API (no /v1, another service); openai.APIConnectionError or an httpx error when nothing
        answers; openai.APIStatusError when the server refuses the key (401 / 403) or is busy or failing for now
        (429, 5xx).
        """
        base = self.settings.openai_base_url
        try:
            served = [str(m.id) for m in self.client.with_options(timeout=timeout).models.list()]
        except (openai.APIConnectionError, httpx2.HTTPError):
            raise
        except openai.APIStatusError as exc:
            if exc.status_code == 508:
                raise RemoteSetupError(SELF_LOOP_MESSAGE) from None
            if exc.status_code in (401, 403, 429) or exc.status_code >= 500:
                raise
            raise RemoteSetupError(
                f"{base}/models answered {exc.status_code}: it does not look like an OpenAI-compatible API (the URL "
                "usually ends in /v1, e.g. http://127.0.0.1:23333/v1)"
            ) from None
        except Exception as exc:  # a page or JSON that is not a model list (openai's parsing raises many kinds)
            raise RemoteSetupError(
                f"{base}/models did not answer with an OpenAI model list ({type(exc).__name__}): check "
                "INTERNLM_OPENAI_BASE_URL (it usually ends in /v1, e.g. http://127.0.0.1:23333/v1)"
            ) from None
        if not served:  # a model server lists what it serves; a JSON object of something else reads as no model
            raise RemoteSetupError(
                f"{base}/models lists no model: not an OpenAI-compatible API, or no model is loaded there (check "
                "INTERNLM_OPENAI_BASE_URL, e.g. http://127.0.0.1:23333/v1)"
            )
        return served

    def discover_model(self, timeout: float = 5.0) -> None:
        """Ask the server's `/v1/models` what it serves, so the UI shows that and requests name it.

        The configured INTERNLM_OPENAI_MODEL is kept when the server lists it; otherwise the server's first model
        is used (servers refuse a name they do not serve) and a warning says so. An unreachable server, or one that
        refuses the key, leaves the configured name: replies will report that themselves (it may still be starting).
        RemoteSetupError (from `served_models`): every reply would fail, so the load fails and says why.
        """
        base = self.settings.openai_base_url
        try:
            served = self.served_models(timeout)
        except (openai.APIConnectionError, httpx2.HTTPError) as exc:
            log.warning("could not list the models of %s: %s", base, exc)
            return
        except openai.APIStatusError as exc:  # the key refused, or the server busy or failing for now
            log.warning("%s answered %s to /models: %s", base, exc.status_code, _error_message(exc))
            return
        self._use_served(served)

    def _use_served(self, served: list[str]) -> None:
        """Name what the server serves in requests: the configured model when listed, else the first one."""
        self.info.extra["served_models"] = served
        if served and self.model not in served:
            log.warning(
                "%s does not serve %r; using %r, which it does", self.settings.openai_base_url, self.model, served[0]
            )
            self.model = served[0]
        self.info.name = self.model
        self._discovered = bool(served)

    def unavailable(self) -> str | None:
        """Why the model server cannot take a reply now (unreachable, refusing the key, not that API), else None.
        Asks its `/v1/models` (2 s at most); an answer is reused for HEALTH_CACHE_SECONDS."""
        now = time.monotonic()
        if now - self._checked[0] < HEALTH_CACHE_SECONDS:
            return self._checked[1]
        problem = None
        try:
            self._use_served(self.served_models(timeout=2.0))  # a server that started after the load is named now
        except RemoteSetupError as exc:
            problem = str(exc)
        except openai.APIStatusError as exc:
            problem = f"the model server at {self.settings.openai_base_url} answered {exc.status_code}" + (
                " (INTERNLM_OPENAI_API_KEY refused)" if exc.status_code in (401, 403) else ""
            )
        except (openai.APIConnectionError, httpx2.HTTPError) as exc:
            problem = f"cannot reach the model server at {self.settings.openai_base_url}: {exc}"
        self._checked = (now, problem)
        return problem

    def decoding(self) -> None:
        """Decoded on the remote server: nothing to say here."""
        return None

    def release_memory(self) -> tuple[list, list]:
        """No model and no GPU cache here: nothing to release."""
        return [], []

    def count_tokens(self, text: str) -> int:
        """An estimate that errs high (the server's tokenizer is not here)."""
        return estimate_tokens(text)

    def prompt_tokens(self, messages: list[Message]) -> int:
        """An estimate that errs high: each message's text and a few tokens of its turn's markers."""
        return sum(estimate_tokens(m["content"]) + 5 for m in messages) + 5

    def stream_chunks(
        self,
        messages: list[Message],
        params: SamplingParams,
        options: ReplyOptions = ReplyOptions(),
        *,
        cancel: threading.Event | None = None,
        events: ReplyEvents | None = None,
        max_length: int | None = None,
    ) -> Reply[ReplyChunk]:
        """The reply as text-only ReplyChunks. Tools, JSON output, seed, logprobs, penalties and raw prompts need a
        local model: InvalidRequestError naming the request field (keep_history is the server's to apply)."""
        for param, asked, what in (
            ("tools", options.tools or options.force_tool_call, "tool calling"),
            ("response_format", options.json_schema is not None, "JSON output"),
            ("seed", options.seed is not None, "a seed"),
            ("logprobs", options.logprobs is not None, "logprobs"),
            ("presence_penalty", bool(options.presence_penalty), "presence_penalty"),
            ("frequency_penalty", bool(options.frequency_penalty), "frequency_penalty"),
            ("prompt", options.raw_prompt, "a raw prompt (/v1/completions)"),
        ):
            if asked:
                raise InvalidRequestError(
                    f"{param}: {what} needs the local model; this app forwards chats to "
                    f"{self.settings.openai_base_url} (INTERNLM_BACKEND=openai), which it does not ask for that",
                    param,
                )
        texts = self.stream_reply(
            messages, params, cancel=cancel, events=events, max_length=max_length, stop=options.stop
        )
        return _as_chunks(texts)

    @property
    def active_requests(self) -> int:
        """Streamed requests running now (a cancelled one counts until its connection is closed)."""
        return self._loop.active

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
        stop: list[str] | None = None,
    ) -> Reply[str]:
        """Yield reply text from the server; the messages are checked here, the request is sent on the first next().

        Setting `cancel` or closing the iterator closes the HTTP stream, which stops generation on the server.
        `max_length` is accepted for the seam's sake: the server applies its own context limit. `stop`: stop strings
        the server ends the reply at (so that it stops generating, and counts, there).
        """
        validate_messages(messages)
        if not messages or messages[-1]["role"] != "user":
            raise InvalidRequestError("the conversation must end with a user message")
        sent = [_openai_message(message) for message in messages]
        if sent[0]["role"] != "system":  # say "no system prompt" explicitly: some servers add a default one
            sent = [{"role": "system", "content": ""}, *sent]
        extra: dict = {"repetition_penalty": params.repetition_penalty}  # extensions of vLLM, LMDeploy and this API
        if params.top_k:  # 0 (off) is left out: vLLM 0.8 refuses it (it wants -1)
            extra["top_k"] = params.top_k
        request = {
            "model": self.model,
            "messages": sent,
            "temperature": 0.0 if params.greedy else params.temperature,
            "top_p": 1.0 if params.greedy else params.top_p,
            "max_tokens": params.max_new_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "extra_body": extra,
        }
        if stop:
            request["stop"] = stop
        return self._stream(request, cancel, events or ReplyEvents())

    def _stream(self, request: dict, cancel: threading.Event | None, events: ReplyEvents) -> Reply[str]:
        stats = events.stats
        started = time.perf_counter()
        chunks: queue.Queue = queue.Queue()
        outcome: dict = {}  # finish reason and usage as the server sent them
        closed = threading.Event()  # the consumer closed the iterator
        count, first_at, failure, drained = 0, None, None, False
        if cancel is not None and cancel.is_set():
            self._finish(stats, started, None, 0, {}, cancelled=True)
            return
        task = self._loop.submit(self._request(request, chunks, outcome, cancel, closed))
        try:
            while (item := chunks.get()) is not _END:
                count += 1
                first_at = first_at or time.perf_counter()
                yield item
            drained = True
        finally:
            closed.set()  # a closed iterator (GeneratorExit here) ends the request like a cancel
            if drained:  # the task is ending on its own (done, cancelled by `cancel`, or failed): its error, if any
                failure = task.exception()
            # Else the consumer went away (closed, or collected): `closed` makes the task cancel its read within
            # _WATCH_SECONDS and close the connection, which stops the server's generation.
            if failure is None and drained and outcome.get("finish", "") is None:
                failure = _NoFinish()  # a 200 that was not a chat stream (a page, plain JSON): never an empty success
            if isinstance(failure, Exception):
                stats.finish_reason = "error"
                error = engine_error(
                    failure, self.settings.openai_base_url, timeout=self.settings.openai_timeout, started=count > 0
                )
                stats.error = str(error)
                self._finish(stats, started, first_at, count, outcome, cancelled=False)
                raise error from failure
            if failure is not None:
                raise failure
            self._finish(stats, started, first_at, count, outcome, cancelled="finish" not in outcome)

    async def _request(
        self,
        request: dict,
        chunks: queue.Queue,
        outcome: dict,
        cancel: threading.Event | None,
        closed: threading.Event,
    ) -> None:
        """The request as a task of the backend's loop: chunks go to `chunks`, then _END; ends early on a cancel."""
        self._loop.active += 1
        reader = asyncio.ensure_future(self._read(request, chunks, outcome))
        try:
            while not reader.done():
                if closed.is_set() or (cancel is not None and cancel.is_set()):
                    reader.cancel()
                    break
                await asyncio.wait([reader], timeout=_WATCH_SECONDS)
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        finally:
            if not reader.done():  # this task itself was cancelled: the read must not outlive it
                reader.cancel()
            self._loop.active -= 1
            chunks.put(_END)

    async def _read(self, request: dict, chunks: queue.Queue, outcome: dict) -> None:
        if not self._discovered:  # the server was not up at load: ask what it serves now
            with contextlib.suppress(Exception):  # the request itself reports a server that still does not answer
                self._use_served([str(m.id) async for m in self.async_client.with_options(timeout=5).models.list()])
        request = {**request, "model": self.model}
        try:
            stream = await self.async_client.chat.completions.create(**request)
        except openai.BadRequestError as exc:
            # vLLM refuses max_tokens beyond the room the prompt leaves; the local engine caps it: so does this,
            # once, from the refusal's own figures.
            sizes = window_and_prompt(_error_message(exc))
            room = sizes[0] - sizes[1] if sizes else 0
            if not 0 < room < request["max_tokens"]:
                raise
            stream = await self.async_client.chat.completions.create(**{**request, "max_tokens": room})
        finish, usage = None, None
        async with stream:
            async for chunk in stream:
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    finish = choice.finish_reason or finish
                    if text := (choice.delta.content if choice.delta else None):
                        chunks.put(text)
        outcome.update(finish=finish, usage=usage)

    @staticmethod
    def _finish(stats, started: float, first_at: float | None, count: int, outcome: dict, cancelled: bool) -> None:
        """Fill the reply's stats: tokens (the server's usage when it sent one), times, and why it ended."""
        ended = time.perf_counter()
        usage = outcome.get("usage")
        stats.total_seconds = ended - started
        stats.prompt_tokens = usage.prompt_tokens if usage else 0
        stats.completion_tokens = usage.completion_tokens if usage else count
        if first_at is not None:
            stats.time_to_first_token = first_at - started
            if stats.completion_tokens > 1 and ended > first_at:
                stats.tokens_per_second = (stats.completion_tokens - 1) / (ended - first_at)
        if stats.finish_reason != "error":
            stats.finish_reason = "cancelled" if cancelled else ("length" if outcome["finish"] == "length" else "stop")
