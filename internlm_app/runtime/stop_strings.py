"""Stop strings: the reply ends at the first one, which is cut off; O(new text) per streamed chunk."""

from __future__ import annotations


def _prefix_function(pattern: str) -> list[int]:
    """Knuth-Morris-Pratt failure table: for each prefix, the length of its longest proper prefix that is a suffix."""
    table, k = [0] * len(pattern), 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = table[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        table[i] = k
    return table


class StopFilter:
    """Cuts the reply at the first stop string; while streaming, holds back text that may be the start of one.

    Each stop string has a Knuth-Morris-Pratt automaton fed only the new text, so a chunk costs O(its length × the
    number of stops), amortised, whatever the stops' lengths (a chunk is checked on the server's event loop). At the
    first character where a stop string completes, the reply is cut at its start (the earliest start, should several
    complete there).
    """

    def __init__(self, stops: list[str] | None):
        self.stops = stops or []
        self._tables = [_prefix_function(stop) for stop in self.stops]
        self._matched = [0] * len(self.stops)  # per stop: how many of its first characters end the text so far
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        if self.hit:
            return ""
        base = len(self.pending)
        self.pending += text
        for offset, char in enumerate(text):
            cut = None
            for i, stop in enumerate(self.stops):
                matched, table = self._matched[i], self._tables[i]
                while matched and stop[matched] != char:
                    matched = table[matched - 1]
                if stop[matched] == char:
                    matched += 1
                if matched == len(stop):
                    start = base + offset + 1 - len(stop)
                    cut = start if cut is None else min(cut, start)
                    matched = table[matched - 1]
                self._matched[i] = matched
            if cut is not None:
                self.hit = True
                text, self.pending = self.pending[:cut], ""
                return text
        keep = len(self.pending) - max(self._matched)  # a stop may still complete over the text held back
        text, self.pending = self.pending[:keep], self.pending[keep:]
        return text

    def flush(self) -> str:
        """The text held back, released: the end of the text, or a boundary no stop string spans (a control token)."""
        text, self.pending = self.pending, ""
        self._matched = [0] * len(self.stops)
        return text
