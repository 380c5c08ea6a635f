"""What the OpenAI routes share: starting n replies, usage, the dropped-history notice, server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace

import anyio
from fastapi import Request
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from internlm_app.api.errors import engine_error_details, openai_error
from internlm_app.api.replies import ReplyRunner
from internlm_app.chat_types import EngineError, Message, ReplyOptions, TokenLogprob
from internlm_app.sampling import SamplingParams

log = logging.getLogger(__name__)

DROPPED_HEADER = "X-Dropped-Messages"  # how many of the oldest messages were left out to fit the context window
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# A stream open when the server shuts down ends as such within this time (below uvicorn's graceful shutdown, 5-10 s).
SHUTDOWN_GRACE_SECONDS = 3.0
SHUTDOWN_MESSAGE = "the server is shutting down: this reply was cut short; send the request again once it is back"


def logprob_entry(record: TokenLogprob) -> dict:
    """OpenAI's chat logprobs entry: token, logprob, bytes (a list of ints) and top_logprobs."""
    top = [{"token": text, "logprob": value, "bytes": list(data)} for text, data, value in record.top]
    return {"token": record.token, "logprob": record.logprob, "bytes": list(record.bytes), "top_logprobs": top}


@dataclass
class ResponseIds:
    """The id, creation time and model name every object of one response carries."""

    prefix: str
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{self.prefix}-{uuid.uuid4().hex}"


async def start_runners(
    request: Request,
    prompts: list[list[Message]],
    params: SamplingParams,
    options: Callable[[int], ReplyOptions],
) -> list[ReplyRunner]:
    """Start one reply per prompt (n choices are n copies), concurrently: they share the batch or the worker's line.

    `options(i)` gives choice i's options (its seed). If one fails to start, the others are closed and it raises.
    The queue limit lets several choices in as one request (QueueFullError here if it would refuse a reply now),
    so a request's own choices never get it refused, also on an idle server with a limit below n; they count
    against it from that moment (`GpuQueue.reserve`), so requests arriving together cannot all pass the check.
    """
    queue = request.app.state.backend.queue  # None: a remote server queues requests itself
    admissions = queue.reserve(len(prompts)) if len(prompts) > 1 and queue is not None else None

    def options_of(i: int) -> ReplyOptions:
        return replace(options(i), admission=admissions[i]) if admissions is not None else options(i)

    runners = [ReplyRunner(request, messages, params, options_of(i)) for i, messages in enumerate(prompts)]
    results = await asyncio.gather(*(runner.start() for runner in runners), return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        with anyio.CancelScope(shield=True):
            for runner in runners:
                await runner.close()
        raise failures[0]
    return runners


def seeds(seed: int | None) -> Callable[[int], int | None]:
    """Choice i's seed: seed + i (modulo 2**63, torch's range), so n seeded choices differ from each other and
    repeat across requests."""
    return lambda i: None if seed is None else (seed + i) % 2**63


def usage(runners: list[ReplyRunner], n: int) -> dict:
    """OpenAI usage: each prompt counted once (runners come as n choices per prompt), its cached tokens as those of
    its first choice, completion tokens over every choice."""
    firsts = runners[::n]
    prompt_tokens = sum(r.stats.prompt_tokens for r in firsts)
    completion = sum(r.stats.completion_tokens for r in runners)
    cached = sum(r.stats.cached_tokens for r in firsts)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def dropped_messages(runners: list[ReplyRunner]) -> int:
    return max((r.stats.dropped_messages for r in runners), default=0)


def dropped_headers(runners: list[ReplyRunner]) -> dict[str, str]:
    dropped = dropped_messages(runners)
    return {DROPPED_HEADER: str(dropped)} if dropped else {}


async def close_all(runners: list[ReplyRunner]) -> None:
    with anyio.CancelScope(shield=True):
        for runner in runners:
            await runner.close()


def sse_data(data: str) -> bytes:
    """One `data:` event as sse-starlette frames it with sep "\\n", for data of one line (JSON, `[DONE]`).

    Handed over as bytes, which sse-starlette sends as they are: it would otherwise build and encode a
    ServerSentEvent per chunk, on the event loop that also hands the chunks over.
    """
    return f"data: {data}\n\n".encode()


def event_stream(runners: list[ReplyRunner], events: AsyncIterator[dict | str]) -> EventSourceResponse:
    """`data: {json}` events (a dict, or its JSON already), an error event if generation fails after the first, then
    `data: [DONE]`; leaving early (the client went) stops every reply. When the server shuts down meanwhile
    (sse-starlette's `shutdown_event`, set on uvicorn's exit signal), the replies stop at their next token and the
    stream ends as such, with a `server_shutting_down` error event and `[DONE]`, within SHUTDOWN_GRACE_SECONDS rather
    than being cut off mid-event."""
    shutdown = anyio.Event()

    async def stop_on_shutdown() -> None:
        await shutdown.wait()
        for runner in runners:
            runner.cancel.set()  # each ends within one token: its chunks end, then the events

    async def framed() -> AsyncIterator[bytes]:
        watcher = asyncio.ensure_future(stop_on_shutdown())
        try:
            async for event in events:
                if shutdown.is_set():  # what follows ends a cut reply as if it had ended ("stop"): the error says it
                    break
                yield sse_data(event if isinstance(event, str) else json.dumps(event, ensure_ascii=False))
            if shutdown.is_set():
                error = openai_error(503, SHUTDOWN_MESSAGE, "server_shutting_down", None)
                yield sse_data(json.dumps(error, ensure_ascii=False))
        except EngineError as exc:  # e.g. out of memory after the first token: the status line is already sent
            code, param, _ = engine_error_details(exc)
            yield sse_data(json.dumps(openai_error(exc.status, str(exc), code, param), ensure_ascii=False))
        except Exception as exc:  # a bug: still an error event and [DONE], never a cut connection
            log.exception("a streamed response failed")
            yield sse_data(json.dumps(openai_error(500, f"internal server error: {type(exc).__name__}")))
        finally:
            watcher.cancel()
            if (close := getattr(events, "aclose", None)) is not None:
                with anyio.CancelScope(shield=True):
                    await close()
            await close_all(runners)
        answered.set()  # (not reached when the client went first: its leaving cancels this generator)
        yield sse_data("[DONE]")

    answered = anyio.Event()

    async def client_went(_message: object) -> None:  # the request log says 499 (see RequestLogMiddleware)
        if answered.is_set():
            return  # the whole answer was out: a client that closes the connection at its end read it
        for runner in runners:
            runner.request.state.client_gone = True

    headers = {**SSE_HEADERS, **dropped_headers(runners)}
    return EventSourceResponse(
        framed(),
        headers=headers,
        sep="\n",
        background=BackgroundTask(close_all, runners),
        shutdown_event=shutdown,
        shutdown_grace_period=SHUTDOWN_GRACE_SECONDS,
        client_close_handler_callable=client_went,
    )
