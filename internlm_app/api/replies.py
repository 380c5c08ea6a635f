"""One reply for an HTTP request: the backend's blocking iterator run in worker threads, cancelled on disconnect."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from functools import partial

import anyio
from anyio import to_thread
from fastapi import Request

from ..chat_types import Message, ReplyEvents, ReplyStats
from ..sampling import SamplingParams

_END = object()
DISCONNECT_POLL_SECONDS = 0.1


class ReplyRunner:
    """Drives `backend.stream_reply` from the event loop without blocking it; the client leaving cancels it."""

    def __init__(self, request: Request, messages: list[Message], params: SamplingParams):
        state = request.app.state
        self.request, self.messages, self.params = request, messages, params
        self.backend, self.metrics, self.limiter = state.backend, state.metrics, state.generation_limiter
        self.cancel = threading.Event()
        self.events = ReplyEvents()
        self.disconnected = False
        self.finish_reason: str | None = None  # set by the route when it ends the reply itself (a stop string)
        self._iterator = None
        self._lock = threading.Lock()  # one next()/close() on the iterator at a time, even after an abandoned pull
        self._first: object = _END
        self._done = False
        if state.settings.log_prompts:
            request.state.prompt = messages[-1]["content"]

    async def start(self) -> None:
        """Validate, wait for the GPU and the first chunk: errors up to here still get an HTTP status."""
        try:
            stream = partial(self.backend.stream_reply, cancel=self.cancel, events=self.events)
            self._iterator = await to_thread.run_sync(stream, self.messages, self.params, limiter=self.limiter)
            self.request.state.reply_stats = self.events.stats  # the request passed validation: log its reply
            self._first = await self._pull()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.close()
            raise

    async def chunks(self) -> AsyncIterator[str]:
        """The reply's text chunks; leaving the loop early (or being cancelled) stops generation."""
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
        return "".join([chunk async for chunk in self.chunks()])

    async def close(self) -> None:
        """Stop generation if it still runs, wait until the GPU is free, record metrics (idempotent)."""
        if self._done:
            return
        self._done = True
        self.cancel.set()  # no effect on a reply that has already ended
        if self._iterator is None:
            return  # refused before generation: no reply to record
        await to_thread.run_sync(self._close_iterator, limiter=self.limiter)
        stats = self.events.stats
        finish = self.finish_reason or ("cancelled" if self.disconnected else stats.finish_reason)
        self.request.state.finish_reason = finish
        self.metrics.observe_reply(stats, finish)

    @property
    def stats(self) -> ReplyStats:
        return self.events.stats

    async def _pull(self) -> object:
        """The next chunk (or _END), read in a worker thread while the client's connection is watched."""
        failure: Exception | None = None
        async with anyio.create_task_group() as group:
            group.start_soon(self._watch_disconnect)
            try:
                chunk = await to_thread.run_sync(self._next, abandon_on_cancel=True, limiter=self.limiter)
            except anyio.get_cancelled_exc_class():
                self.cancel.set()  # cancelled from outside (e.g. the response saw the client go): stop generating
                raise
            except Exception as exc:  # kept out of the task group, which would wrap it in an ExceptionGroup
                failure, chunk = exc, _END
            group.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return chunk

    async def _watch_disconnect(self) -> None:
        while not self.cancel.is_set():
            try:
                gone = await self.request.is_disconnected()
            except Exception:  # a server that cannot tell: the response's own disconnect check still applies
                return
            if gone:
                self.disconnected = True
                self.cancel.set()
                return
            await anyio.sleep(DISCONNECT_POLL_SECONDS)

    def _next(self) -> object:
        with self._lock:
            return next(self._iterator, _END)

    def _close_iterator(self) -> None:
        with self._lock:
            self._iterator.close()
