"""Faults injected through torch's public forward hooks, as a real GPU failure would surface."""

from __future__ import annotations

import torch


class FailOnForward:
    """A forward hook that raises CUDA's out-of-memory error on the n-th forward pass (1 = prefill)."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def __call__(self, module, args, output):
        self.calls += 1
        if self.calls == self.at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
