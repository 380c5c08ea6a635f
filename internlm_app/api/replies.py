"""One reply for an HTTP request: the backend's blocking iterator run in worker threads, cancelled on disconnect."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from functools import partial

import anyio
from anyio import to_thread
from fastapi import Request

from internlm_app.chat.reply_reader import stream_chunks
from internlm_app.chat_types import Message, QueueFullError, ReplyChunk, ReplyEvents, ReplyOptions, ReplyStats
from internlm_app.sampling import SamplingParams

_END = object()
DISCONNECT_POLL_SECONDS = 0.1


class ReplyRunner:
    """Drives the backend's reply from the event loop without blocking it; the client leaving cancels it.

    One thread per reply reads the blocking iterator and hands each chunk to the loop (no thread hop per chunk), and
    one task per reply watches the connection.
    """

    def __init__(
        self,
        request: Request,
        messages: list[Message],
        params: SamplingParams,
        options: ReplyOptions | None = None,
    ):
        state = request.app.state
        self.request, self.messages, self.params = request, messages, params
        self.options = options or ReplyOptions()
        self.backend, self.metrics, self.limiter = state.backend, state.metrics, state.generation_limiter
        self.cancel = threading.Event()
        self.events = ReplyEvents()
        self.disconnected = False
        self.finish_reason: str | None = None  # set by the route when it ends the reply itself (a stop string)
        self._iterator = None
        self._ready: asyncio.Queue | None = None
        self._pump: threading.Thread | None = None
        self._watcher: asyncio.Task | None = None
        self._first: object = _END
        self._failure: Exception | None = None  # what ended the reply, raised from its thread
        self._done = False
        if state.settings.log_prompts:
            request.state.prompt = messages[-1]["content"]

    async def start(self) -> None:
        """Validate, wait for the GPU and the first chunk: errors up to here still get an HTTP status."""
        loop, self._ready = asyncio.get_running_loop(), asyncio.Queue()
        try:
            stream = partial(stream_chunks, self.backend, cancel=self.cancel, events=self.events)
            self._iterator = await to_thread.run_sync(
                stream, self.messages, self.params, self.options, limiter=self.limiter
            )
            self.request.state.reply_stats = self.events.stats  # the request passed validation: log its reply
            self._pump = threading.Thread(target=self._run_pump, args=(loop,), name="internlm-api-pump", daemon=True)
            self._pump.start()
            self._watcher = asyncio.ensure_future(self._watch_disconnect())
            self._first = await self._pull()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.close()
            raise

    async def chunks(self) -> AsyncIterator[ReplyChunk]:
        """The reply's chunks; leaving the loop early (or being cancelled) stops generation."""
        try:
            chunk = self._first
            while chunk is not _END:
                yield chunk
                chunk = await self._pull()
        finally:
            with anyio.CancelScope(shield=True):
                await self.close()

    async def text(self) -> str:
        await self.start()
        return "".join([chunk.text async for chunk in self.chunks()])

    async def close(self) -> None:
        """Stop generation if it still runs, wait until the GPU is free, record metrics (idempotent)."""
        if self._done:
            return
        self._done = True
        self.cancel.set()  # no effect on a reply that has already ended
        if self.options.admission is not None:  # (a choice that never got in line gives its place back)
            self.options.admission.give_back()
        if self._watcher is not None:
            self._watcher.cancel()
        if self._iterator is None:
            return  # refused before generation: no reply to record
        if self._pump is not None:
            await to_thread.run_sync(self._pump.join, limiter=self.limiter)
        else:
            self._iterator.close()
        if isinstance(self._failure, QueueFullError):  # refused (503) before it was generated: not a reply
            self.request.state.reply_stats = None
            return
        stats = self.events.stats
        finish = self.finish_reason or ("cancelled" if self.disconnected else stats.finish_reason)
        self.request.state.finish_reason = finish
        self.metrics.observe_reply(stats, finish)

    @property
    def stats(self) -> ReplyStats:
        return self.events.stats

    def _run_pump(self, loop: asyncio.AbstractEventLoop) -> None:
        """Body of the reply's thread: every chunk, then _END or the exception, goes to the loop's queue."""
        last: object = _END
        try:
            for chunk in self._iterator:
                loop.call_soon_threadsafe(self._ready.put_nowait, chunk)
                if self.cancel.is_set():
                    break
        except Exception as exc:  # QueueFullError, GenerationError ...: raised by _pull on the loop
            last = exc
        finally:
            self._iterator.close()  # stops generation within one token when the loop above ended early
            with contextlib.suppress(RuntimeError):  # the loop is already closed (server shutdown)
                loop.call_soon_threadsafe(self._ready.put_nowait, last)

    async def _pull(self) -> object:
        """The next chunk, or _END; a failure in the reply's thread is raised here."""
        try:
            item = await self._ready.get()
        except asyncio.CancelledError:
            self.cancel.set()  # cancelled from outside (e.g. the response saw the client go): stop generating
            raise
        if isinstance(item, Exception):
            self._failure = item
            raise item
        return item

    async def _watch_disconnect(self) -> None:
        while not self.cancel.is_set():
            try:
                gone = await self.request.is_disconnected()
            except Exception:  # a server that cannot tell: the response's own disconnect check still applies
                return
            if gone:
                self.disconnected = True
                self.request.state.client_gone = True  # the request log says 499, not the status sent to nobody
                self.cancel.set()
                return
            await anyio.sleep(DISCONNECT_POLL_SECONDS)
