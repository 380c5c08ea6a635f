"""What a model load reports while it runs: typed steps (download bytes, converted shards, load, warm-up), an English
line for terminals, and a throttled terminal printer. The web app translates the same steps (web/loading_view.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Stage = Literal["download", "convert", "load", "warmup", "batch", "connect"]
STAGES: tuple[Stage, ...] = ("download", "convert", "load", "warmup", "batch", "connect")


@dataclass(frozen=True)
class LoadStep:
    """One report of a load in progress.

    - `download`: `done` / `total` in bytes over every file of the model (total 0 while the file list is unknown),
      `files_done` / `files_total` files, `detail` the file being fetched;
    - `convert`: `done` / `total` shards converted, `detail` the shard's file name;
    - `load` (weights into memory), `warmup` (a first reply on each decode path), `batch` (starting the continuous
      batch), `connect` (a remote backend's `/v1/models`): no fraction; `detail` says more where there is more.
    """

    stage: Stage
    done: int = 0
    total: int = 0
    files_done: int = 0
    files_total: int = 0
    detail: str = ""

    @property
    def fraction(self) -> float | None:
        """0..1 when the stage has a known size, else None (the UI shows elapsed time, never a looping bar)."""
        if self.total <= 0:
            return None
        return min(max(self.done / self.total, 0.0), 1.0)


Progress = Callable[[LoadStep], None]


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KB' (decimal units, as download sizes are quoted: 15.5 GB)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def describe(step: LoadStep) -> str:
    """The step in one English line, for terminals and logs."""
    if step.stage == "download":
        size = f"{human_bytes(step.done)} of {human_bytes(step.total)}" if step.total else human_bytes(step.done)
        files = f", file {step.files_done}/{step.files_total}" if step.files_total else ""
        return f"downloading the model: {size}{files}" + (f" ({step.detail})" if step.detail else "")
    if step.stage == "convert":
        shard = f"converting the checkpoint: shard {step.done}/{step.total}"
        return shard + (f" ({step.detail})" if step.detail else "")
    text = {
        "load": "loading the weights into memory",
        "warmup": "warming up the generation worker",
        "batch": "starting the continuous batch",
        "connect": "asking the remote server which model it serves",
    }[step.stage]
    return text + (f" ({step.detail})" if step.detail else "")


class TerminalProgress:
    """A Progress that logs each new stage at once and, within a stage, at most one line per `interval` seconds.

    A 15.5 GB download reports thousands of chunks; the terminal gets a line every few seconds, plus the last one.
    """

    def __init__(self, logger: logging.Logger, interval: float = 5.0):
        self._log, self._interval = logger, interval
        self._stage: Stage | None = None
        self._last = 0.0

    def __call__(self, step: LoadStep) -> None:
        now = time.monotonic()
        finished = step.total > 0 and step.done >= step.total
        if step.stage == self._stage and not finished and now - self._last < self._interval:
            return
        self._stage, self._last = step.stage, now
        self._log.info("%s", describe(step))
