"""KV reuse across turns on the one-reply path: caches kept by the token ids they hold, lent by longest common prefix.

The next turn of a chat starts with the previous prompt and reply; a regenerate or an edit shares everything before
the changed message. Lending the cache with the longest common prefix, cropped to it, leaves only the new tokens to
prefill. transformers' `generate(cache=...)` prefills exactly the ids past the cache's length.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from transformers import Cache


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Number of leading ids two sequences share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Entry:
    ids: list[int]  # the ids whose keys and values the cache holds, position by position
    cache: Cache


class PrefixCache:
    """Least-recently-used KV caches, at most `max_tokens` tokens in all (or one static buffer); 0 reuses nothing.

    `lend(ids)` hands out the cache whose ids share the longest prefix with `ids`, cropped to that prefix (and never
    past `len(ids) - 1`: generate needs one id to prefill), or a new one; `give_back(cache, ids)` keeps it for the next
    turn. Lent caches leave the store, so two replies never share one. A cache that shares less than half of its ids
    with the prompt (another conversation's, whose beginning is the same) is not taken from its conversation: the
    prompt gets a copy of the shared part. Thread-safe.
    """

    def __init__(self, new_cache: Callable[[], Cache], max_tokens: int, *, single_buffer: bool = False):
        self._new_cache = new_cache
        self.max_tokens = max_tokens
        self.single_buffer = single_buffer  # a static cache: one preallocated buffer, reused for every reply
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # oldest first
        self._lock = threading.Lock()
        self._keys = 0

    @property
    def tokens(self) -> int:
        with self._lock:
            return sum(len(e.ids) for e in self._entries.values())

    def lend(self, ids: list[int]) -> tuple[Cache, int]:
        """A cache for a prompt, and how many of its leading ids the cache already holds."""
        limit = len(ids) - 1 if self.max_tokens > 0 else 0
        with self._lock:
            best_key, best = None, 0
            for key, entry in self._entries.items():
                shared = min(common_prefix_length(entry.ids, ids), limit)
                if shared >= best:
                    best_key, best = key, shared
            usable = best_key is not None and (best > 0 or self.single_buffer)  # the static buffer is always reused
            if usable and not self.single_buffer and 2 * best < len(self._entries[best_key].ids):
                # Mostly another conversation's (a shared system prompt, an early edit): it stays for that one's
                # next turn, and this prompt gets a copy of the shared beginning.
                return self._copy_prefix(self._entries[best_key].cache, best), best
            entry = self._entries.pop(best_key) if usable else None
        if entry is None:
            return self._new_cache(), 0
        held = int(entry.cache.get_seq_length())
        if held > best:
            entry.cache.crop(-(held - best))
        return entry.cache, best

    def _copy_prefix(self, cache: Cache, length: int) -> Cache:
        """A new cache holding the keys and values of `cache`'s first `length` positions (copied, through the public
        `Cache.update`)."""
        copy = self._new_cache()
        for index, layer in enumerate(cache.layers):
            copy.update(layer.keys[:, :, :length].clone(), layer.values[:, :, :length].clone(), index)
        return copy

    def give_back(self, cache: Cache, ids: list[int]) -> None:
        """Keep a cache after a reply; `ids` are the prompt and reply ids (the cache holds their first ones)."""
        held = int(cache.get_seq_length())
        if not self.single_buffer and (held == 0 or self.max_tokens <= 0 or held > self.max_tokens):
            return  # the static buffer always comes back: it is the only one
        with self._lock:
            self._keys += 1
            self._entries[self._keys] = _Entry(list(ids[:held]), cache)
            if self.single_buffer:
                return
            total = sum(len(e.ids) for e in self._entries.values())
            while total > self.max_tokens:
                _, oldest = self._entries.popitem(last=False)
                total -= len(oldest.ids)

    def clear(self) -> None:
        """Forget every kept cache (after a failure, or to free memory)."""
        with self._lock:
            self._entries.clear()
