"""Stream one reply into the page and the store; a stop, a rerun or a closed tab keeps the partial reply as stopped."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..chat_types import ChatBackend, EngineError, ReplyEvents, ReplyStats
from ..sampling import SamplingParams
from ..store import ConversationStore, StoreFault
from .throttle import SAVE_INTERVAL_SECONDS, Throttle, throttled_text

log = logging.getLogger(__name__)

WATCH_SECONDS = 1.0


class LiveReplies:
    """Which conversation is generating which message in this process right now (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replies: dict[str, int] = {}

    def start(self, cid: str, mid: int) -> None:
        with self._lock:
            self._replies[cid] = mid

    def finish(self, cid: str, mid: int) -> None:
        with self._lock:
            if self._replies.get(cid) == mid:
                del self._replies[cid]

    def reply_of(self, cid: str) -> int | None:
        """The message being generated for `cid`, if any."""
        with self._lock:
            return self._replies.get(cid)


class ReplyNotSaved(StoreFault):
    """The reply was generated (`text`) but the database failed to save it."""

    def __init__(self, fault: StoreFault, text: str):
        super().__init__(fault.kind, fault.path, fault.detail)
        self.text = text


@dataclass
class ReplyOutcome:
    """The saved reply: its id, text, status (complete, stopped or error) and stats."""

    mid: int
    text: str
    status: str
    stats: ReplyStats


def _close(chunks: Iterator[str] | None) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()  # the engine stops generating within one token and frees the GPU


def _recorded(chunks: Iterator[str], received: list[str], poll: Callable[[], None] | None) -> Iterator[str]:
    for chunk in chunks:
        received.append(chunk)
        if poll is not None:
            poll()
        yield chunk


def _interrupted(stats: ReplyStats) -> str:
    """Status of a reply whose consumer went away: complete only if the model had really finished."""
    if stats.finish_reason in ("stop", "length") and stats.completion_tokens:
        return "complete"
    stats.finish_reason = "cancelled"
    return "stopped"


def run_reply(
    backend: ChatBackend,
    store: ConversationStore,
    cid: str,
    params: SamplingParams,
    *,
    show: Callable[[str], None],
    on_queue: Callable[[int], None] | None = None,
    live: LiveReplies | None = None,
    on_start: Callable[[], None] | None = None,
    poll: Callable[[], None] | None = None,
    max_length: int | None = None,
) -> ReplyOutcome:
    """Generate the reply to `cid`: `show` gets the growing text (throttled), the store every state of the reply."""
    # Streamlit ends a script (stop button, rerun, closed tab) by raising StopException/RerunException from the next
    # st call, i.e. from `show` or `on_queue`. Then the engine's iterator is closed at once (generation stops within
    # one token and the GPU queue is released), the partial reply is saved as stopped, and the exception goes on.
    # `poll` runs for every chunk (a token, or the tokens of one stream interval), between throttled updates, so that
    # a stop is noticed at the next chunk, not at the next page update.
    # `on_start` runs once the reply is saved as streaming and registered in `live`.
    messages = store.messages_for_model(cid)
    events = ReplyEvents(on_queue=on_queue)
    mid = store.add_message(cid, "assistant", "", status="streaming")
    if live is not None:
        live.start(cid, mid)
    received: list[str] = []  # every chunk, also those a throttled update has not shown yet
    chunks = None
    try:
        try:
            if on_start is not None:
                on_start()
            chunks = backend.stream_reply(messages, params, events=events, max_length=max_length)
            saver = Throttle(SAVE_INTERVAL_SECONDS)
            saver.ready()  # the first periodic save is due one interval after the start
            for text in throttled_text(_recorded(chunks, received, poll)):
                show(text)
                if saver.ready():
                    _save_progress(store, mid, text)
            status = "stopped" if events.stats.finish_reason == "cancelled" else "complete"
        except Exception as exc:  # EngineError: bad request, context too long, GPU out of memory ...
            if not isinstance(exc, EngineError):
                log.exception("reply failed")
            status = "error"
            events.stats.finish_reason = "error"
            events.stats.error = events.stats.error or str(exc) or type(exc).__name__
        except BaseException:
            _close(chunks)
            _save(store, mid, "".join(received), _interrupted(events.stats), events.stats)
            raise
        text = "".join(received)
        try:
            store.update_message(mid, text, status, events.stats)
        except StoreFault as fault:
            log.error("reply %s (%s, %s) could not be saved: %s", mid, status, events.stats.error or "", fault)
            raise ReplyNotSaved(fault, text) from fault
        return ReplyOutcome(mid, text, status, events.stats)
    finally:
        _close(chunks)
        if live is not None:
            live.finish(cid, mid)


def _save(store: ConversationStore, mid: int, text: str, status: str, stats: ReplyStats) -> None:
    try:
        store.update_message(mid, text, status, stats)
    except Exception:  # never hide the reason the reply ended behind a storage error
        log.exception("could not save reply %s", mid)


def _save_progress(store: ConversationStore, mid: int, text: str) -> None:
    """A periodic save while streaming; a failing file does not stop the reply (its end is saved, or reported)."""
    try:
        store.update_message(mid, text, "streaming")
    except StoreFault as fault:
        log.warning("could not save reply %s while streaming: %s", mid, fault)
