"""Rate limits for a streaming reply: page updates (at most ~20/s whatever the token rate) and periodic saves."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

UI_UPDATES_PER_SECOND = 20
# 5% above 1/20 s, so that jitter between the throttle and the drawing never puts 21 updates in one second.
UI_UPDATE_INTERVAL = 1.05 / UI_UPDATES_PER_SECOND
SAVE_INTERVAL_SECONDS = 2.0


class Throttle:
    """Lets an action through at most once per `interval` seconds (the first call always passes)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self._clock = clock
        self._last: float | None = None

    def ready(self) -> bool:
        """True (and the clock restarts) when at least `interval` seconds passed since the last True."""
        now = self._clock()
        if self._last is None or now - self._last >= self.interval:
            self._last = now
            return True
        return False


def throttled_text(
    chunks: Iterable[str],
    interval: float = UI_UPDATE_INTERVAL,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[str]:
    """The text accumulated from `chunks`, yielded at most once per `interval` and always once more at the end."""
    throttle = Throttle(interval, clock)
    parts: list[str] = []
    shown = 0
    for chunk in chunks:
        parts.append(chunk)
        if throttle.ready():
            shown = len(parts)
            yield "".join(parts)
    if shown != len(parts) or not parts:
        yield "".join(parts)
