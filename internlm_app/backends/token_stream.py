"""The hand-over of one reply's token ids from a decoding thread to the thread that streams the text."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from queue import Empty, SimpleQueue

END = object()  # the last item of every stream, after the tokens, also when decoding failed or was cancelled


class TokenStream:
    """Token ids of one reply, in order, then END; `failure` holds the error when decoding failed.

    Written by one decoding thread (the worker, or the batch's output dispatcher), read by one consumer. `finish` runs
    once: later calls are ignored, so a cancel and a late final output cannot end a reply twice.
    """

    def __init__(self, on_finish: Callable[[], None] | None = None):
        self._items: SimpleQueue = SimpleQueue()
        self._lock = threading.Lock()
        self._on_finish = on_finish
        self._ended = False
        self.finished = threading.Event()  # set after on_finish ran: whoever waits for it finds the slot free
        self.failure: BaseException | None = None
        self.cached_tokens = 0  # prompt tokens whose KV cache was reused rather than prefilled

    def put(self, token_ids: Iterable[int]) -> None:
        if self._ended:
            return
        for token in token_ids:
            self._items.put(token)

    def finish(self, failure: BaseException | None = None) -> bool:
        """End the stream (with a failure, if any); True for the call that ended it."""
        with self._lock:
            if self._ended:
                return False
            self._ended = True
            self.failure = failure
            self._items.put(END)
        try:
            if self._on_finish is not None:
                self._on_finish()
        finally:
            self.finished.set()
        return True

    def get(self, timeout: float | None = None) -> object:
        """The next token id, or END; raises queue.Empty after `timeout` seconds."""
        return self._items.get(timeout=timeout)

    def empty(self) -> bool:
        return self._items.empty()


__all__ = ["END", "Empty", "TokenStream"]
