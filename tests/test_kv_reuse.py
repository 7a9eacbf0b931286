"""CPU: the monokernel backend's KV reuse (settle / reuse / save / restore) with the GPU side
faked: NumPy arrays stand in for the K/V caches, the host-mapped words are NumPy arrays."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np

from kogcupy.gpu.device_weights import kv_bytes
from kogcupy.gpu.monokernel import MonokernelBackend
from kogcupy.model.config import ModelConfig
from kogcupy.prefix_cache import PrefixCache

CFG = ModelConfig(arch="llama", vocab_size=100, hidden_size=32, intermediate_size=64,
                  n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, rms_norm_eps=1e-5,
                  rope_theta=1e4, max_position_embeddings=64, tie_word_embeddings=True)
C = 64


def backend(budget_tokens):
    b = object.__new__(MonokernelBackend)
    b.lcfg, b.context_length = CFG, C
    n = CFG.n_layers * CFG.n_kv_heads * C * CFG.head_dim
    b.k_cache, b.v_cache = np.zeros(n, np.uint16), np.zeros(n, np.uint16)
    b._stream = contextlib.nullcontext()
    b._wait_idle = lambda: None
    b._ctl = SimpleNamespace(u32=np.zeros(4, np.uint32))
    b._host_tokens = SimpleNamespace(i32=np.zeros(C, np.int32))
    b.prefix_cache = PrefixCache(int(kv_bytes(CFG, budget_tokens)))
    b._kv_ids, b._last_launch, b._active = [], None, None
    return b


def write(b, ids):
    """What the GPU would do for a launch of `ids` generating `gen`: K/V rows = the token id."""
    kc, vc = b._kv_views()
    for pos, t in enumerate(ids):
        kc[:, pos], vc[:, pos] = t, t + 1000


def run(b, prompt, gen):
    """A request: reuse, then the 'kernel' writes K/V of prompt + gen[:-1] and publishes gen."""
    m = min(b._reuse(prompt), len(prompt) - 1)
    kc, _ = b._kv_views()
    assert all(int(kc[0, i, 0]) == prompt[i] for i in range(m)), "restored K/V match the prompt"
    write(b, prompt + gen[:-1])
    b._last_launch = (list(prompt), len(prompt) - 1)       # the launch starts at the last token
    b._ctl.u32[0] = len(gen)
    b._host_tokens.i32[:len(gen)] = gen
    return m


def test_extend_restore_and_evict():
    b = backend(budget_tokens=40)
    sys_ = list(range(1, 21))
    assert run(b, sys_, [50, 51, 52]) == 0
    assert b._kv_ids == []                      # settled lazily, at the next request
    turn2 = sys_ + [50, 51, 52, 60, 61]
    assert run(b, turn2, [70, 71]) == 22        # prompt + gen[:-1] were in the live cache
    assert b._kv_ids == sys_ + [50, 51]
    assert len(b.prefix_cache) == 0             # extending the live sequence saves nothing
    other = [90, 91, 92, 93]
    assert run(b, other, [5]) == 0              # unrelated: the live sequence is saved first
    assert len(b.prefix_cache) == 1
    assert run(b, turn2 + [70, 99], [1]) == 26  # restored from the cache, better than live
    assert b._kv_ids == turn2 + [70]
    assert run(b, turn2[:10] + [7, 7], [1]) == 10   # diverges inside the cached prefix
    lens = lambda: sorted(len(e.ids) for e in b.prefix_cache._entries)   # noqa: E731
    assert lens() == [4, 27]          # the 27-token live sequence replaced its 26-token prefix
    assert run(b, list(range(30, 60)), [1]) == 0    # saving the 12-token one evicts the LRU (4)
    assert lens() == [12, 27] and b.prefix_cache.nbytes <= kv_bytes(CFG, 40)


def test_cancelled_launch_and_forget():
    b = backend(budget_tokens=40)
    run(b, [1, 2, 3, 4], [9, 9, 9])
    b._ctl.u32[0] = 0                           # the kernel published nothing (cancelled early)
    b._settle()
    assert b._kv_ids == [1, 2, 3]               # what the launch started from
    b._forget_kv()
    assert run(b, [1, 2, 3, 4], [5]) == 0       # nothing reusable after a failed launch


def test_a_launch_that_is_not_a_request_releases_the_live_cache():
    # teacher-forced logits and the warm-up overwrite the live cache: the last request is
    # settled first (with no prefix cache too), so a later prompt is matched against what
    # the overwriting launch wrote, never against the request before it
    for budget in (None, 40):
        b = backend(budget_tokens=40)
        if budget is None:
            b.prefix_cache = None
        a = [1, 2, 3, 4]
        run(b, a, [9, 8])
        b._release_live()
        assert b._kv_ids == [] and b._last_launch is None
        forced = [5, 6, 7]
        write(b, forced)
        b._kv_ids = list(forced)                # what logits() records after its launch
        # a's prompt and first generated token were saved only where there is a store
        assert run(b, a + [9, 10], [1]) == (0 if budget is None else 5)
