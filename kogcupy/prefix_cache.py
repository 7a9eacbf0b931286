"""Prompt-prefix cache policy: which earlier sequence's KV a new request can start from.

Backend-agnostic and pure Python (NumPy only for the comparisons). A backend stores an opaque
payload (e.g. copies of the KV cache positions [0, len(ids))) under the token ids it was written
for; a new request asks for the entry sharing the longest prefix with its ids, restores those
positions and runs only the rest.

    cache = PrefixCache(budget_bytes=1 << 30)         # 0: off
    n, entry = cache.match(prompt_ids)                # entry.payload holds KV for >= n positions
    cache.put(prompt_ids + generated[:-1], (k, v), k.nbytes + v.nbytes)

Eviction is least-recently-used (``match`` and ``put`` both count as a use) until the new entry
fits the byte budget. An entry whose ids are a prefix of a newer entry's ids is redundant and
dropped; a put whose ids are a prefix of a stored entry's ids stores nothing (already covered).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError


@dataclass(eq=False)
class CacheEntry:
    ids: tuple[int, ...]                  # token ids whose KV the payload holds, positions 0..
    payload: Any                          # opaque to the cache
    nbytes: int                           # counted against the budget
    last_used: int                        # use counter of the cache (larger = more recent)
    arr: np.ndarray = field(repr=False)   # ids as int64 (len(ids),), for fast comparison


def common_prefix_len(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two 1-D int arrays (vectorized compare)."""
    m = min(a.shape[0], b.shape[0])
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if diff.size else m


class PrefixCache:
    """LRU store of (token ids -> payload) under a byte budget; see the module docstring."""

    def __init__(self, budget_bytes: int):
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)) \
                or budget_bytes < 0:
            raise InputError(f"prefix cache budget must be an integer number of bytes >= 0, "
                             f"got {budget_bytes!r}")
        self.budget_bytes = int(budget_bytes)
        self._entries: list[CacheEntry] = []
        self._clock = 0
        self.hits = 0
        self.hit_tokens = 0
        self.lookups = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, ids) -> tuple[int, CacheEntry | None]:
        """Longest common prefix between ids and any entry's ids: (n_tokens, entry), the entry
        marked used; (0, None) when nothing shares a first token."""
        self.lookups += 1
        if not self._entries or len(ids) == 0:
            return 0, None
        q = np.asarray(ids, dtype=np.int64).reshape(-1)          # (n,)
        best_n, best = 0, None
        for e in self._entries:
            if e.arr[0] != q[0]:
                continue
            n = common_prefix_len(q, e.arr)
            if n > best_n:
                best_n, best = n, e
        if best is None:
            return 0, None
        best.last_used = self._tick()
        self.hits += 1
        self.hit_tokens += best_n
        return best_n, best

    def put(self, ids, payload, nbytes: int) -> bool:
        """Store payload under ids (evicting LRU entries until it fits); False when it was not
        stored: cache off, empty ids, or nbytes over the whole budget."""
        nbytes = int(nbytes)
        if self.budget_bytes == 0 or len(ids) == 0 or nbytes > self.budget_bytes:
            return False
        q = np.asarray(ids, dtype=np.int64).reshape(-1)          # (n,)
        n = q.shape[0]
        keep = []
        for e in self._entries:
            m = e.arr.shape[0]
            if m >= n and common_prefix_len(q, e.arr) == n:      # already covered by e
                e.last_used = self._tick()
                return True
            if m < n and common_prefix_len(q, e.arr) == m:       # e is a prefix: redundant
                continue
            keep.append(e)
        self._entries = keep
        while self._entries and self.nbytes + nbytes > self.budget_bytes:
            self._entries.remove(min(self._entries, key=lambda e: e.last_used))
        self._entries.append(CacheEntry(ids=tuple(int(i) for i in q), payload=payload,
                                        nbytes=nbytes, last_used=self._tick(), arr=q))
        return True

    def clear(self):
        self._entries = []

    @property
    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.nbytes, "budget": self.budget_bytes,
                "hits": self.hits, "hit_tokens": self.hit_tokens, "lookups": self.lookups}
