"""PrefixCache policy: longest-prefix match, LRU eviction under the byte budget, redundancy."""
from __future__ import annotations

import time

import numpy as np
import pytest

from kogcupy.errors import InputError
from kogcupy.prefix_cache import PrefixCache, common_prefix_len


def test_partial_prefix_hit_and_divergence():
    c = PrefixCache(1000)
    assert c.put([1, 2, 3, 4, 5], "a", 10)
    assert c.match([1, 2, 3, 4, 5, 6, 7]) == (5, c.match([1, 2, 3, 4, 5])[1])   # extends it
    n, e = c.match([1, 2, 3])                     # shorter than the entry
    assert n == 3 and e.payload == "a" and e.ids == (1, 2, 3, 4, 5)
    n, e = c.match([1, 2, 9, 4, 5])               # diverges inside the cached prefix
    assert n == 2 and e.payload == "a"
    assert c.match([9, 1, 2]) == (0, None) and c.match([]) == (0, None)
    s = c.stats
    assert s["entries"] == 1 and s["bytes"] == 10 and s["budget"] == 1000
    assert s["lookups"] == 6 and s["hits"] == 4 and s["hit_tokens"] == 5 + 5 + 3 + 2


def test_longest_of_several_entries_wins():
    c = PrefixCache(1000)
    c.put([1, 2, 3, 7, 7], "short", 10)
    c.put([1, 2, 3, 4, 5, 6], "long", 10)
    c.put([2, 2, 3, 4, 5, 6, 8], "other", 10)
    assert c.match([1, 2, 3, 4, 5, 0])[1].payload == "long"
    assert c.match([1, 2, 3, 7, 0])[1].payload == "short"
    assert c.match([2, 2])[1].payload == "other"


def test_lru_eviction_under_budget():
    c = PrefixCache(30)
    for i in range(3):
        assert c.put([i, 0, 0], f"p{i}", 10)
    assert c.match([0, 0, 0])[0] == 3             # entry 0 used: entry 1 is now the oldest
    assert c.put([3, 0, 0], "p3", 10)
    assert c.match([1, 0, 0]) == (0, None)
    assert [c.match([i, 0, 0])[1].payload for i in (0, 2, 3)] == ["p0", "p2", "p3"]
    assert c.put([4], "big", 25)                  # evicts until it fits: only it is left
    assert c.stats["entries"] == 1 and c.stats["bytes"] == 25
    assert c.match([4])[1].payload == "big"


def test_entry_larger_than_budget_is_not_stored():
    c = PrefixCache(30)
    c.put([1, 2], "keep", 10)
    assert not c.put([5, 6], "huge", 31)
    assert c.stats["entries"] == 1 and c.match([1, 2])[1].payload == "keep"


def test_prefix_entries_are_replaced_and_covered_puts_store_nothing():
    c = PrefixCache(100)
    c.put([1, 2, 3], "turn1", 10)
    c.put([1, 2, 3, 4, 5], "turn2", 20)           # turn1 is a prefix of it: dropped
    assert c.stats["entries"] == 1 and c.stats["bytes"] == 20
    assert c.put([1, 2, 3, 4], "sub", 15)         # covered by turn2: nothing new stored
    assert c.stats["entries"] == 1 and c.match([1, 2, 3, 4, 5])[1].payload == "turn2"
    c.put([1, 2, 7], "branch", 10)                # shares a prefix only: both kept
    assert c.stats["entries"] == 2
    c.clear()
    assert c.stats["entries"] == 0 and c.match([1, 2, 3]) == (0, None)


def test_budget_zero_is_off():
    c = PrefixCache(0)
    assert not c.put([1, 2, 3], "x", 0)
    assert c.match([1, 2, 3]) == (0, None) and c.stats["entries"] == 0
    for bad in (-1, 1.5, "1", True):
        with pytest.raises(InputError, match="budget"):
            PrefixCache(bad)


def test_common_prefix_len():
    a = np.arange(10)
    assert common_prefix_len(a, a) == 10
    assert common_prefix_len(a, a[:4]) == 4
    b = a.copy()
    b[6] = -1
    assert common_prefix_len(a, b) == 6 and common_prefix_len(a[1:], a) == 0


def test_long_prompts_match_fast():
    rng = np.random.default_rng(0)
    c = PrefixCache(1 << 40)
    base = rng.integers(0, 50000, 32768).tolist()
    for i in range(16):                           # 16 x 32k-token entries sharing 16k tokens
        c.put(base[:16384] + rng.integers(0, 50000, 16384).tolist() + [i], i, 1)
    q = list(base)
    q[16384 + 100] = -1
    t = time.perf_counter()
    for _ in range(10):
        n, _e = c.match(q)
    assert n >= 16384
    assert (time.perf_counter() - t) / 10 < 0.015  # ~1.5 ms; a per-token Python loop: ~50 ms
