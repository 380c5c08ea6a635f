"""Stream one reply into the page and the store; a stop, a rerun or a closed tab keeps the partial reply as stopped."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from streamlit.runtime.scriptrunner_utils.exceptions import RerunException, StopException

from internlm_app.chat.context import model_messages
from internlm_app.chat_types import ChatBackend, EngineError, ReplyEvents, ReplyStats
from internlm_app.sampling import SamplingParams
from internlm_app.store.db import ConversationStore
from internlm_app.store.errors import StoreFault
from internlm_app.web.throttle import SAVE_INTERVAL_SECONDS, Throttle, throttled_text

log = logging.getLogger(__name__)

WATCH_SECONDS = 1.0

# How Streamlit ends a page's script run before its end (a stop; a rerun: any interaction, another page, a closed
# tab): it raises one of these from the next st call. The only place the app names them; a ReplyView's default.
PAGE_INTERRUPTIONS: tuple[type[BaseException], ...] = (StopException, RerunException)


class LiveReplies:
    """Which conversation is generating which message in this process right now, its text so far, and how to stop
    it (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replies: dict[str, int] = {}
        self._cancels: dict[str, threading.Event] = {}
        self._texts: dict[str, str] = {}

    def start(self, cid: str, mid: int, cancel: threading.Event | None = None) -> None:
        with self._lock:
            self._replies[cid] = mid
            self._cancels[cid] = cancel or threading.Event()
            self._texts[cid] = ""

    def update(self, cid: str, mid: int, text: str) -> None:
        with self._lock:
            if self._replies.get(cid) == mid:
                self._texts[cid] = text

    def finish(self, cid: str, mid: int) -> None:
        with self._lock:
            if self._replies.get(cid) == mid:
                del self._replies[cid], self._cancels[cid], self._texts[cid]

    def reply_of(self, cid: str) -> int | None:
        """The message being generated for `cid`, if any."""
        with self._lock:
            return self._replies.get(cid)

    def text_of(self, cid: str) -> str | None:
        """The text generated so far for `cid`'s live reply (None when none runs)."""
        with self._lock:
            return self._texts.get(cid)

    def stop(self, cid: str) -> None:
        """Stop `cid`'s live reply (wherever it runs: a page's script or the background) at its next token."""
        with self._lock:
            cancel = self._cancels.get(cid)
        if cancel is not None:
            cancel.set()


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


def _alive(chunks: Iterator[str] | None) -> bool:
    """Whether the reply's iterator can go on (a generator that raised, e.g. from its queue callback, cannot)."""
    return chunks is not None and getattr(chunks, "gi_frame", True) is not None


def _interrupted(stats: ReplyStats) -> str:
    """Status of a reply whose consumer went away: complete only if the model had really finished."""
    if stats.finish_reason in ("stop", "length") and stats.completion_tokens:
        return "complete"
    stats.finish_reason = "cancelled"
    return "stopped"


@dataclass
class ReplyView:
    """Where a reply shows while it streams (the page's side): `show` gets the growing text (throttled); `on_queue`
    the place in line while it waits for the GPU; `on_start` runs once the reply is saved as streaming and
    registered as live; `poll` runs for every chunk (a token, or one stream interval's tokens), between throttled
    updates, so that a stop is noticed at the next chunk rather than at the next page update. `interrupted_by`: the
    exceptions by which the page ends its run from one of these callbacks (Streamlit's, PAGE_INTERRUPTIONS)."""

    show: Callable[[str], None]
    on_queue: Callable[[int], None] | None = None
    on_start: Callable[[], None] | None = None
    poll: Callable[[], None] | None = None
    interrupted_by: tuple[type[BaseException], ...] = PAGE_INTERRUPTIONS


@dataclass
class WebReply:
    """One reply to generate for a stored conversation, saved in every state (streaming, complete, stopped, error).

    `version_of`: regenerate that reply, as a new version of it (the old ones stay); `stream`: another source of the
    chunks with `backend.stream_reply`'s signature (a reply with tools); `max_length`: the context budget.
    """

    backend: ChatBackend
    store: ConversationStore
    cid: str
    params: SamplingParams
    max_length: int | None = None
    version_of: int | None = None
    stream: Callable[..., Iterator[str]] | None = None

    def run(self, view: ReplyView, live: LiveReplies | None = None) -> ReplyOutcome:
        """Generate the reply into `view` and the store; the outcome once it ended here.

        Streamlit ends a running script on any interaction (a sidebar button, the language, another page, a message
        typed meanwhile, a closed tab) by raising one of PAGE_INTERRUPTIONS from the next st call, i.e. from the
        view's callbacks (`view.interrupted_by`). With `live` (the page), that ends only the page's part: the reply
        goes on in a background thread (`_finish_in_background`), registered in `live`, where the next run of any
        page shows it; only a Stop button (`live.stop`, the cancel event) ends it, within one token, saved as
        stopped. Without `live`, or when the reply had already ended (a stop while waiting in line), the engine's
        iterator is closed at once (the GPU queue is released) and the partial reply is saved as stopped.
        """
        store, cid = self.store, self.cid
        # The reply is made first: a regenerated one is a new version, which selects the path the model reads.
        if self.version_of is None:
            mid = store.add_message(cid, "assistant", "", status="streaming")
        else:
            mid = store.add_version(self.version_of, "", "streaming")
        events = ReplyEvents(on_queue=view.on_queue)
        cancel = threading.Event()
        if live is not None:
            live.start(cid, mid, cancel)
        received: list[str] = []  # every chunk, also those a throttled update has not shown yet
        chunks = None
        detached = False
        try:
            try:
                if view.on_start is not None:
                    view.on_start()
                # With the files attached and the tool calls made; a read that fails ends the reply as an error.
                messages = model_messages(store, cid)
                chunks = (self.stream or self.backend.stream_reply)(
                    messages, self.params, cancel=cancel, events=events, max_length=self.max_length
                )
                saver = Throttle(SAVE_INTERVAL_SECONDS)
                saver.ready()  # the first periodic save is due one interval after the start
                for text in throttled_text(_recorded(chunks, received, view.poll)):
                    if live is not None:
                        live.update(cid, mid, text)
                    view.show(text)
                    if saver.ready():
                        _save_progress(store, mid, text)
                status = "stopped" if events.stats.finish_reason == "cancelled" else "complete"
            except Exception as exc:  # EngineError: bad request, context too long, GPU out of memory ...
                if not isinstance(exc, EngineError):
                    log.exception("reply failed")
                status = "error"
                events.stats.finish_reason = "error"
                events.stats.error = events.stats.error or str(exc) or type(exc).__name__
            except view.interrupted_by:
                if live is None or not _alive(chunks):  # no page to show it, or it ended (e.g. while in line)
                    _close(chunks)
                    _save(store, mid, "".join(received), _interrupted(events.stats), events.stats)
                    raise
                detached = True  # the page's script ended: the reply goes on without it (a Stop button cancels it)
                _finish_in_background(chunks, received, events, store, cid, mid, live)
                raise
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
            if not detached:
                _close(chunks)
                if live is not None:
                    live.finish(cid, mid)


def _finish_in_background(chunks, received, events, store, cid, mid, live) -> threading.Thread:
    """Go on with a reply whose page moved on: the rest of its chunks into `live` and the store, then its end."""

    def run() -> None:
        saver = Throttle(SAVE_INTERVAL_SECONDS)
        status, text = "complete", "".join(received)
        try:
            for chunk in chunks:  # per chunk: the text grows by it, never joined again from the start
                received.append(chunk)
                text += chunk
                live.update(cid, mid, text)
                if saver.ready():
                    _save_progress(store, mid, text)
            status = "stopped" if events.stats.finish_reason == "cancelled" else "complete"
        except Exception as exc:  # the engine's error ends the reply as it would on the page
            status = "error"
            events.stats.finish_reason = "error"
            events.stats.error = events.stats.error or str(exc) or type(exc).__name__
        finally:
            _close(chunks)
            _save(store, mid, "".join(received), status, events.stats)
            live.finish(cid, mid)

    thread = threading.Thread(target=run, name="internlm-web-reply", daemon=True)
    thread.start()
    return thread


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
