"""A first-come-first-served semaphore around the GPU that tells waiters their place in line."""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable

from internlm_app.chat_types import QueueAdmission, QueueFullError


class Admission:
    """One of a request's choices, let in with the others as one (`GpuQueue.reserve`). Until the choice is in a line
    or has a slot (`acquire(admission=...)`), or gives its place back (`give_back`: it never got that far), it counts
    against the limit, so that requests arriving meanwhile cannot all pass the check before any choice is in line."""

    __slots__ = ("_queue", "held")

    def __init__(self, queue: GpuQueue):
        self._queue, self.held = queue, True

    def give_back(self) -> None:
        """No longer counted (idempotent)."""
        self._queue.settle(self)


class GpuQueue:
    """FIFO admission: at most `slots` replies generate at once, waiters are served in arrival order."""

    def __init__(
        self,
        max_waiting: int | None = None,
        poll_seconds: float = 0.25,
        slots: int = 1,
        shares_limit_with: GpuQueue | None = None,
    ):
        """`shares_limit_with`: another line whose waiters count here too (in `waiting()` and against `max_waiting`),
        and ours there: two lines, one limit, one order of arrival (`ticket`) and one lock, so that checking the limit
        and getting in line is one step across both lines (two arrivals, one per line, never both take the last place).
        """
        if slots < 1:
            raise ValueError("a GPU queue needs at least one slot")
        # Reentrant: acquire() holds it while waiting() takes it again.
        self._cond = threading.Condition(threading.RLock())
        self._waiting: deque[int] = deque()
        self._tickets = itertools.count()
        self._active = 0
        self.slots = slots
        self.max_waiting = max_waiting
        self.poll_seconds = poll_seconds
        self._other: GpuQueue | None = None
        self._reserved = [0]  # admissions not yet in a line (`reserve`), one count for both lines
        if shares_limit_with is not None:
            self._other, shares_limit_with._other = shares_limit_with, self
            self._tickets = shares_limit_with._tickets
            self._cond = shares_limit_with._cond
            self._reserved = shares_limit_with._reserved

    @property
    def busy(self) -> bool:
        """Every slot is taken: a new request has to wait."""
        return self._active >= self.slots

    @property
    def active(self) -> int:
        return self._active

    def waiting(self) -> int:
        """Replies waiting in this line, and in the line it shares its limit with, and the admitted choices on their
        way to a line (`reserve`) beyond this line's free slots."""
        with self._cond:
            coming = max(0, self._reserved[0] - max(0, self.slots - self._active))
            return self.in_line() + (self._other.in_line() if self._other is not None else 0) + coming

    def in_line(self, before: int | None = None) -> int:
        """Replies waiting in this line alone; with `before`, only those whose ticket is older than that one."""
        if before is None:
            return len(self._waiting)
        with self._cond:
            return bisect.bisect_left(self._waiting, before)

    def ticket(self) -> int:
        """A place in the order of arrival, for `acquire(ticket=...)`: a reply that waits in the line this one shares
        its limit with first, then here, keeps the place it took when it came."""
        return next(self._tickets)

    def check_room(self) -> None:
        """Raise QueueFullError if a reply arriving now would be refused: every slot taken (or about to be, by admitted
        choices, or someone waits) and `max_waiting` replies already wait, in this line and the one it shares its
        limit with."""
        with self._cond:
            if self._active + self._reserved[0] < self.slots and not self._waiting:
                return
            if self.max_waiting is not None and (waiting := self.waiting()) >= self.max_waiting:
                raise QueueFullError(f"the model is busy and {waiting} requests are already waiting")

    def reserve(self, count: int) -> list[QueueAdmission]:
        """Let a request's `count` choices in as one: QueueFullError if a reply arriving now would be refused
        (`check_room`), else one Admission per choice, counted against the limit from now on, in the same step."""
        with self._cond:
            self.check_room()
            self._reserved[0] += count
            return [Admission(self) for _ in range(count)]

    def settle(self, admission: Admission) -> None:
        """`admission` no longer counts as on its way (it is in a line, or gave its place back); idempotent."""
        with self._cond:
            if admission.held:
                admission.held = False
                self._reserved[0] -= 1
                self._cond.notify_all()

    def try_acquire(self) -> bool:
        """Take a slot only if one is free and nobody waits; never queues."""
        with self._cond:
            if self._active < self.slots and not self._waiting:
                self._active += 1
                return True
            return False

    def acquire(
        self,
        on_wait: Callable[[int], None] | None = None,
        cancel: threading.Event | None = None,
        timeout: float | None = None,
        ticket: int | None = None,
        admitted: bool = False,
        admission: QueueAdmission | None = None,
    ) -> bool:
        """Wait for a slot; False when cancelled or timed out. Raises QueueFullError when the line is too long.

        `ticket` (from `ticket()`): wait ahead of those that came after it took it, rather than behind everyone.
        `admitted`: the limit is not checked (`check_room`): it already waited in the line this one shares its limit
        with (a reply that waited its turn is never refused for those that came after it), or it is one of a
        request's choices and the request was let in. `admission`: such a choice; from here on it counts as in
        this line (or generating), no longer as on its way (`reserve`), in the same step."""
        with self._cond:
            if admission is not None:
                admission.give_back()  # (the lock is reentrant, and both lines share it)
                admitted = True
            if self._active < self.slots and not self._waiting:
                self._active += 1
                return True
            if not admitted:
                self.check_room()
            ticket = next(self._tickets) if ticket is None else ticket
            bisect.insort(self._waiting, ticket)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                with self._cond:
                    if self._active < self.slots and self._waiting[0] == ticket:
                        self._waiting.popleft()
                        self._active += 1
                        self._cond.notify_all()
                        return True
                    place = self._waiting.index(ticket) + 1
                    if (cancel is not None and cancel.is_set()) or (
                        deadline is not None and time.monotonic() >= deadline
                    ):
                        self._waiting.remove(ticket)
                        self._cond.notify_all()
                        return False
                if on_wait is not None:
                    on_wait(place)  # outside the lock: a callback may take its time (e.g. update a web page)
                with self._cond:
                    if self._active >= self.slots or self._waiting[0] != ticket:
                        self._cond.wait(self.poll_seconds)
        except BaseException:
            with self._cond:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                    self._cond.notify_all()
            raise

    def release(self) -> None:
        with self._cond:
            if self._active == 0:
                raise RuntimeError("GpuQueue.release() without acquire()")
            self._active -= 1
            self._cond.notify_all()
