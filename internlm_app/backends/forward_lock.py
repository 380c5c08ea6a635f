"""One forward pass at a time on a model shared by the worker thread and the batch's thread.

transformers' model forward writes `config.is_causal` for its duration when it is passed as an argument (continuous
batching passes `is_causal=False`: its paged attention brings its own mask), and the causal-mask builders read that
config attribute. A forward in another thread meanwhile, or the mask `generate` builds for a static cache between
two forwards, then sees a non-causal config: every token attends to the future, and the reply is wrong (seen on the
tiny model: a greedy reply of 378 tokens became 31). So every forward of the model holds this lock (hooks), and the
worker holds it for each whole decode step, handing it over between steps: the batch's steps and the worker's steps
interleave, each with the config as it should be.
"""

from __future__ import annotations

import threading
import weakref

import torch

_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, ForwardLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _thread_alive(ident: int) -> bool:
    return any(thread.ident == ident for thread in threading.enumerate())


class ForwardLock:
    """A reentrant lock taken around every forward pass of one model; `for_model` gives the model's one lock."""

    def __init__(self, model: torch.nn.Module):
        self._cond = threading.Condition()
        self._owner: int | None = None
        self._depth = 0
        self._waiters = 0
        model.register_forward_pre_hook(self._enter_forward)
        model.register_forward_hook(self._exit_forward, always_call=True)  # also when forward raises

    @classmethod
    def for_model(cls, model: torch.nn.Module) -> ForwardLock:
        with _LOCKS_GUARD:
            lock = _LOCKS.get(model)
            if lock is None:
                lock = _LOCKS[model] = cls(model)
            return lock

    @property
    def held(self) -> bool:
        return self._owner is not None

    def acquire(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            self._waiters += 1
            try:
                while self._owner is not None:
                    # A compiled forward that raises skips always-call hooks: a thread that died holding the lock
                    # (the batch's thread after a fatal error) gives it up.
                    if not _thread_alive(self._owner):
                        self._owner, self._depth = None, 0
                        break
                    self._cond.wait(0.5)
            finally:
                self._waiters -= 1
            self._owner, self._depth = me, 1

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                return
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    def release_all(self) -> None:
        """Give the lock up entirely if this thread holds it (after a failure left hooks unbalanced)."""
        with self._cond:
            if self._owner == threading.get_ident():
                self._owner, self._depth = None, 0
                self._cond.notify_all()

    def hand_over(self) -> None:
        """Between two decode steps: if another thread waits, let it run its forward first, then go on."""
        with self._cond:
            if self._owner != threading.get_ident() or not self._waiters:
                return
            depth, self._owner, self._depth = self._depth, None, 0
            self._cond.notify_all()
            while self._owner is None and self._waiters:  # until a waiter has it: never take it straight back
                self._cond.wait(0.5)
        self.acquire()
        with self._cond:
            self._depth = depth

    @torch.compiler.disable
    def _enter_forward(self, module, args) -> None:
        self.acquire()

    @torch.compiler.disable
    def _exit_forward(self, module, args, output) -> None:
        self.release()
