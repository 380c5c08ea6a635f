"""Stream one reply into the page and the store. The reply runs in its own thread: a rerun or a closed tab ends only
the page's part (the reply goes on, also from its place in line); a Stop keeps the partial reply as stopped."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from streamlit.runtime.scriptrunner_utils.exceptions import RerunException, StopException

from internlm_app.chat.context import model_messages
from internlm_app.chat_types import ChatBackend, EngineError, ReplyEvents, ReplyStats
from internlm_app.sampling import SamplingParams
from internlm_app.store.db import ConversationStore
from internlm_app.store.errors import StoreFault
from internlm_app.web.throttle import SAVE_INTERVAL_SECONDS, UI_UPDATE_INTERVAL, Throttle, throttled_text

log = logging.getLogger(__name__)

WATCH_SECONDS = 1.0
_KEPT = 1000  # request tokens (replies) remembered as started (ended): far more than any page's few runs see

# How Streamlit ends a page's script run before its end (a stop; a rerun: any interaction, another page, a closed
# tab): it raises one of these from the next st call. The only place the app names them; a ReplyView's default.
PAGE_INTERRUPTIONS: tuple[type[BaseException], ...] = (StopException, RerunException)


class LiveReplies:
    """Which conversation is generating which message in this process right now, its text so far (or its place in
    line while it waits for the GPU), and how to stop it (thread-safe). One reply per conversation at a time: a page
    `claim`s the conversation before it saves the user's message, and the claim becomes the reply (`start`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._replies: dict[str, int] = {}
        self._cancels: dict[str, threading.Event] = {}
        self._texts: dict[str, str] = {}
        self._places: dict[str, int] = {}
        self._steps: dict[str, list[dict]] = {}  # the tool calls of a live reply with tools (the runner appends)
        self._claims: dict[str, str] = {}  # conversation -> the ticket of the page that claimed it
        self._taken: dict[str, None] = {}  # request tokens whose reply started (insertion-ordered, bounded)
        self._ended: dict[tuple[str, int], None] = {}  # replies whose end was saved (insertion-ordered, bounded)

    def claim(self, cid: str, token: str | None = None) -> str | None:
        """Reserve `cid` for a reply about to start: the claim's ticket, or None when a reply is starting or running
        already (another tab): the caller queues its message (or keeps its request) instead. `start` turns the claim
        into the reply, `release` with the ticket gives it up. `token`: the page's request (a regenerate or an edit),
        recorded as taken with the claim, so that a run ending after the reply started never starts it a second
        time (`taken`)."""
        with self._lock:
            if cid in self._replies or cid in self._claims:
                return None
            ticket = self._claims[cid] = uuid.uuid4().hex
            if token is not None:
                _remember(self._taken, token)
            return ticket

    def release(self, cid: str, ticket: str, token: str | None = None) -> None:
        """Give up the claim `ticket` whose reply never started (the page's run ended, or the store failed, before
        it); its request `token` may be taken again. No effect once the reply started, or on a later claim (another
        page's, after this one's reply ended)."""
        with self._lock:
            if self._claims.get(cid) != ticket:
                return
            del self._claims[cid]
            if token is not None:
                self._taken.pop(token, None)

    def taken(self, token: str) -> bool:
        """Whether the request `token` has had its reply started (or is starting it now)."""
        with self._lock:
            return token in self._taken

    def busy(self, cid: str) -> bool:
        """A reply of `cid` is starting or running: a message typed now is queued."""
        with self._lock:
            return cid in self._replies or cid in self._claims

    def start(self, cid: str, mid: int, cancel: threading.Event | None = None) -> None:
        with self._lock:
            self._claims.pop(cid, None)
            self._replies[cid] = mid
            self._cancels[cid] = cancel or threading.Event()
            self._texts[cid] = ""
            self._places.pop(cid, None)

    def set_place(self, cid: str, mid: int, place: int) -> None:
        with self._lock:
            if self._replies.get(cid) == mid:
                self._places[cid] = place

    def place_of(self, cid: str) -> int | None:
        """The place in line (1 = next) of `cid`'s live reply while it waits for the GPU and has no text yet."""
        with self._lock:
            return self._places.get(cid) if not self._texts.get(cid) else None

    def update(self, cid: str, mid: int, text: str) -> None:
        with self._lock:
            if self._replies.get(cid) == mid:
                self._texts[cid] = text

    def set_steps(self, cid: str, mid: int, steps: list[dict]) -> None:
        """The list the reply's tool runner appends its calls to, so that any page following the reply shows them
        (also while a tool runs, when no text comes)."""
        with self._lock:
            if self._replies.get(cid) == mid:
                self._steps[cid] = steps

    def steps_of(self, cid: str) -> list[dict]:
        """The tool calls of `cid`'s live reply so far (a copy; empty without tools or when none runs)."""
        with self._lock:
            return list(self._steps.get(cid, ()))

    def finish(self, cid: str, mid: int, saved: bool = True) -> None:
        """The reply `mid` has ended; `saved`: its end (complete, stopped or error) is in the store now."""
        with self._lock:
            if self._replies.get(cid) == mid:
                del self._replies[cid], self._cancels[cid], self._texts[cid]
                self._places.pop(cid, None)
                self._steps.pop(cid, None)
            if saved:
                _remember(self._ended, (cid, mid))

    def ended(self, cid: str, mid: int) -> bool:
        """Whether the reply `mid` of `cid` ran in this process and its end was saved: a page that read it as
        "streaming" read the store just before that save (a Stop or an end racing the page's run); it was not
        interrupted."""
        with self._lock:
            return (cid, mid) in self._ended

    def reply_of(self, cid: str) -> int | None:
        """The message being generated for `cid`, if any."""
        with self._lock:
            return self._replies.get(cid)

    def text_of(self, cid: str) -> str | None:
        """The text generated so far for `cid`'s live reply (None when none runs)."""
        with self._lock:
            return self._texts.get(cid)

    def stop_all(self, timeout: float) -> int:
        """Stop every live reply and wait up to `timeout` seconds for them to end (each saves its text as stopped):
        the server is shutting down. Returns how many had not ended by then."""
        with self._lock:
            cancels = list(self._cancels.values())
        for cancel in cancels:
            cancel.set()
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                left = len(self._replies)
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.05)

    def stop(self, cid: str) -> None:
        """Stop `cid`'s live reply (wherever it runs: a page's script or the background) at its next token."""
        with self._lock:
            cancel = self._cancels.get(cid)
        if cancel is not None:
            cancel.set()


def _remember(seen: dict, key: object) -> None:
    """Add `key` to an insertion-ordered set kept to its newest _KEPT entries."""
    seen[key] = None
    while len(seen) > _KEPT:
        del seen[next(iter(seen))]


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
    registered as live; `poll` runs at every wake-up of the page (each new chunk, and every PAGE_WAKE_SECONDS while
    nothing comes, e.g. in line), so that a stop or a rerun is noticed then rather than at the next page update.
    `interrupted_by`: the exceptions by which the page ends its run from one of these callbacks (Streamlit's,
    PAGE_INTERRUPTIONS). All of them run in the page's thread, never in the one that drives the reply."""

    show: Callable[[str], None]
    on_queue: Callable[[int], None] | None = None
    on_start: Callable[[], None] | None = None
    poll: Callable[[], None] | None = None
    interrupted_by: tuple[type[BaseException], ...] = PAGE_INTERRUPTIONS


PAGE_WAKE_SECONDS = 0.1  # the page checks for a stop or a rerun at least this often while nothing else happens


class ReplyInProgress:
    """One reply being generated, driven by its own thread from its wait in line to its end (`WebReply.start`): it
    saves the reply (periodic saves, then its end: complete, stopped or error) and shows it in `live`. The page only
    follows it (`follow`), so the page's run may end at any moment, also while the reply waits in line, without
    touching the reply; `cancel` (the Stop button, through `live`) ends it within one token."""

    def __init__(
        self, store: ConversationStore, cid: str, mid: int, events: ReplyEvents, live: LiveReplies | None
    ) -> None:
        self.store, self.cid, self.mid, self.events, self.live = store, cid, mid, events, live
        self.cancel = threading.Event()
        self._cond = threading.Condition()
        self._parts: list[str] = []
        self._place: int | None = None
        self._changes = 0
        self._done = False
        self.status = "stopped"
        self.fault: StoreFault | None = None  # the end could not be saved
        self._thread: threading.Thread | None = None

    @property
    def text(self) -> str:
        with self._cond:
            return "".join(self._parts)

    def set_place(self, place: int) -> None:
        """The place in line (1 = next), from the engine while the reply waits (ReplyEvents.on_queue)."""
        with self._cond:
            self._place = place
            self._changes += 1
            self._cond.notify_all()
        if self.live is not None:
            self.live.set_place(self.cid, self.mid, place)

    def start(self, chunks: Iterator[str]) -> None:
        self._thread = threading.Thread(target=self._run, args=(chunks,), name="internlm-web-reply", daemon=True)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def end_before_start(self, status: str) -> None:
        """The reply ended before generating anything (`status`: error or stopped): saved, and out of `live`."""
        self._end(status)

    def _run(self, chunks: Iterator[str]) -> None:
        stats, saver, shown = self.events.stats, Throttle(SAVE_INTERVAL_SECONDS), Throttle(UI_UPDATE_INTERVAL)
        saver.ready()  # the first periodic save is due one interval after the start
        progress = _ProgressSaver(self.store, self.mid)
        status = "stopped"
        try:
            for chunk in chunks:
                with self._cond:
                    self._parts.append(chunk)
                    self._changes += 1
                    self._cond.notify_all()
                if self.live is not None and shown.ready():
                    self.live.update(self.cid, self.mid, self.text)
                if saver.ready():
                    progress.submit(self.text)  # (never waits: a locked file must not hold the text on screen)
            status = "stopped" if stats.finish_reason == "cancelled" else "complete"
        except Exception as exc:  # EngineError: bad request, context too long, GPU out of memory ...
            if not isinstance(exc, EngineError):
                log.exception("reply failed")
            status = "error"
            stats.failed(exc)
        finally:
            _close(chunks)
            progress.close()  # (its last save lands before the end's, never after it)
            self._end(status)

    def _end(self, status: str) -> None:
        stats = self.events.stats
        self.status = status
        if self.live is not None:
            self.live.update(self.cid, self.mid, self.text)  # other tabs show the whole text until they redraw
        saved = False
        deadline = time.monotonic() + FINAL_SAVE_SECONDS
        while True:
            try:
                self.store.update_message(self.mid, self.text, status, stats)
                saved = True
            except StoreFault as fault:
                if fault.kind == "locked" and time.monotonic() < deadline:
                    # Another process holds the file: the text stays live (every page shows it) and the save is
                    # tried again, rather than drop a finished reply after the store's own 30 s of retries.
                    log.warning("reply %s: the conversation file is locked; saving it again", self.mid)
                    time.sleep(FINAL_SAVE_RETRY_SECONDS)
                    continue
                log.error("reply %s (%s, %s) could not be saved: %s", self.mid, status, stats.error or "", fault)
                self.fault = fault
            except Exception:  # never hide the reason the reply ended behind a storage error
                log.exception("could not save reply %s", self.mid)
            break
        if self.live is not None:
            self.live.finish(self.cid, self.mid, saved)
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def follow(self, view: ReplyView) -> ReplyOutcome:
        """In the page's thread: show the reply in `view` until it ends; its outcome. The page's run ending
        (`view.interrupted_by`) ends only this, not the reply, when the reply is in `live`; without `live` (no page
        will show it) the reply is cancelled, saved as stopped, and the interruption raised. Raises ReplyNotSaved
        when the reply's end could not be saved."""
        try:
            if view.on_start is not None:
                view.on_start()
            for text in throttled_text(self._updates(view)):
                view.show(text)
        except view.interrupted_by:
            if self.live is None:
                self.cancel.set()
                self.join()
            raise  # with `live`, the reply goes on in its thread; a Stop button cancels it
        except BaseException:
            self.cancel.set()
            self.join()
            raise
        self.join()
        if self.fault is not None:
            raise ReplyNotSaved(self.fault, self.text)
        return ReplyOutcome(self.mid, self.text, self.status, self.events.stats)

    def _updates(self, view: ReplyView) -> Iterator[str]:
        """The reply's new text at each wake-up of the page, its place in line shown while it waits, and
        `view.poll` at every wake-up; ends when the reply has ended."""
        taken, seen, shown_place = 0, -1, None
        while True:
            with self._cond:
                if self._changes == seen and not self._done:
                    self._cond.wait(PAGE_WAKE_SECONDS)
                seen, place, done = self._changes, self._place, self._done
                new, taken = self._parts[taken:], len(self._parts)
            if view.on_queue is not None and place is not None and place != shown_place:
                shown_place = place
                view.on_queue(place)
            if view.poll is not None:
                view.poll()
            if new:
                yield "".join(new)
            if done:
                return


def _close(chunks: Iterator[str] | None) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()  # the engine stops generating within one token and frees the GPU


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

    def start(self, live: LiveReplies | None = None) -> ReplyInProgress:
        """Save the reply as streaming, register it in `live` (where a `claim` of the conversation becomes this
        reply), and start generating it in its own thread. No st call: whatever the page does after this, only Stop
        ends the reply. A request refused before anything runs (a prompt over the budget, a failed read) ends here
        as an error reply, saved. Raises StoreFault when the reply cannot even be created (a page that claimed the
        conversation gives its claim back)."""
        store, cid = self.store, self.cid
        # The reply is made first: a regenerated one is a new version, which selects the path the model reads.
        if self.version_of is None:
            mid = store.add_message(cid, "assistant", "", status="streaming")
        else:
            mid = store.add_version(self.version_of, "", "streaming")
        events = ReplyEvents()
        reply = ReplyInProgress(store, cid, mid, events, live)
        events.on_queue = reply.set_place
        if live is not None:
            live.start(cid, mid, reply.cancel)
        try:
            # With the files attached and the tool calls made; a read that fails ends the reply as an error.
            messages = model_messages(store, cid)
            chunks = (self.stream or self.backend.stream_reply)(
                messages, self.params, cancel=reply.cancel, events=events, max_length=self.max_length
            )
            if live is not None and (steps := getattr(events.stats, "tool_steps", None)) is not None:
                live.set_steps(cid, mid, steps)  # a reply with tools: its calls, for every page that follows it
        except Exception as exc:  # a bad request, a prompt that does not fit, the store: the reply is an error
            if not isinstance(exc, EngineError):
                log.exception("reply failed")
            events.stats.failed(exc)
            reply.end_before_start("error")
            return reply
        except BaseException:
            reply.end_before_start(_interrupted(events.stats))
            raise
        reply.start(chunks)
        return reply

    def run(self, view: ReplyView, live: LiveReplies | None = None) -> ReplyOutcome:
        """Start the reply and follow it in `view` until it ends (see `start` and `ReplyInProgress.follow`): with
        `live` (the page), any interaction, a reload or a closed tab ends only the page's part, also while the reply
        waits in line; the reply keeps its place, shows in `live` for the next run of any page, and is saved at its
        end. Only a Stop button (`live.stop`) ends it, within one token (or out of the line), saved as stopped."""
        return self.start(live).follow(view)


FINAL_SAVE_SECONDS = 600.0  # how long a finished reply's text is kept trying to be saved while the file is locked
FINAL_SAVE_RETRY_SECONDS = 1.0


class _ProgressSaver:
    """The periodic saves of a streaming reply, in a thread of their own: the reply never waits for one (SQLite
    retries a locked file for 30 s). One save at a time, of the newest text; `close` waits for the one running."""

    def __init__(self, store: ConversationStore, mid: int):
        self._store, self._mid = store, mid
        self._cond = threading.Condition()
        self._pending: str | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, text: str) -> None:
        with self._cond:
            self._pending = text
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="internlm-reply-save", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                if self._pending is None:
                    return
                text, self._pending = self._pending, None
            _save_progress(self._store, self._mid, text)

    def close(self) -> None:
        """Drop what is not saved yet (the end's save has it all) and wait for a save under way."""
        with self._cond:
            self._closed, self._pending = True, None
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()


def _save_progress(store: ConversationStore, mid: int, text: str) -> None:
    """A periodic save while streaming; a failing file does not stop the reply (its end is saved, or reported)."""
    try:
        store.update_message(mid, text, "streaming")
    except StoreFault as fault:
        log.warning("could not save reply %s while streaming: %s", mid, fault)
