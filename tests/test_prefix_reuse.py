"""Prefix reuse on the reference backend: warm runs give the cold run's tokens, and the KV cached
at the end of a stream (finished, cancelled, superseded) is exactly what was written."""
from __future__ import annotations

import numpy as np
import pytest

from kogcupy.engine import Engine
from kogcupy.errors import InputError
from kogcupy.reference.backend import ReferenceBackend
from kogcupy.sampling_params import SamplingParams

GREEDY = SamplingParams()
P = list(range(10, 40))                     # a 30-token shared prefix


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def cold(model):
    be = ReferenceBackend(model, context_length=128, prefix_cache_gb=0)
    return lambda ids, n=8: list(be.start(ids, GREEDY, n, set()))


def run(be, ids, n=8):
    """(greedy tokens, cached_tokens); stale KV from the previous run is poisoned first."""
    be.rm.k_cache[:] = np.nan
    be.rm.v_cache[:] = np.nan
    s = be.start(ids, GREEDY, n, set())
    return list(s), s.cached_tokens


def test_chat_turns_reuse_and_match_cold_runs(model):
    warm = Engine(model, backend="reference", context_length=128)
    cold = Engine(model, backend="reference", context_length=128, prefix_cache_gb=0)
    msgs = [{"role": "system", "content": "You are brief."},
            {"role": "user", "content": "Once upon a time"}]
    list(warm.generate(msgs, max_new_tokens=6))
    r1 = warm.generate(msgs, max_new_tokens=6)
    text1 = "".join(r1)                        # the same prompt ran just before:
    assert r1.result.cached_tokens == r1.result.prompt_tokens - 1
    msgs += [{"role": "assistant", "content": text1}, {"role": "user", "content": "The fox"}]
    g = warm.generate(msgs, max_new_tokens=6)
    list(g)
    assert g.result.cached_tokens >= r1.result.prompt_tokens
    assert f"{g.result.cached_tokens} cached)" in g.result.stats_line()
    c = cold.generate(msgs, max_new_tokens=6)
    list(c)
    assert c.result.cached_tokens == 0 and g.result.token_ids == c.result.token_ids


def test_partial_prefix_and_divergence(model, cold):
    be = ReferenceBackend(model, context_length=128)
    a = P + [50, 51, 52]
    toks_a, n = run(be, a)
    assert n == 0 and toks_a == cold(a)
    b = P + [60, 61]                           # diverges right after the shared prefix
    assert run(be, b) == (cold(b), len(P))
    c = P[:12] + [70] + P[13:]                 # diverges inside the cached prefix
    assert run(be, c) == (cold(c), 12)
    d = P[:20]                                 # shorter than the entry: its last token runs
    assert run(be, d) == (cold(d), 19)
    e = a + toks_a[:5] + [3, 4]                # continues a's generated tokens
    assert run(be, e) == (cold(e), len(a) + 5)
    assert run(be, [5, 6, 7]) == (cold([5, 6, 7]), 0)


def test_saved_entry_is_what_was_written(model, cold):
    be = ReferenceBackend(model, context_length=128)
    s = be.start(P, GREEDY, 20, set())
    got = [next(s) for _ in range(3)]
    s.cancel()
    assert list(s) == [] and s.finish_reason == "cancelled"
    [entry] = be.prefix_cache._entries
    assert entry.ids == tuple(P + got[:2])     # the last token's KV was never written
    x = (got[0] + 1) % 512                     # not got[0]: a branch, not a sub-prefix
    s = be.start(P + [x], GREEDY, 20, set())
    next(s)                                    # superseded without cancel: saved at start()
    be.start([2, 3], GREEDY, 4, set())
    assert any(e.ids == tuple(P + [x]) for e in be.prefix_cache._entries)
    assert run(be, P + got + [9]) == (cold(P + got + [9]), len(P) + 2)


def test_interrupted_forward_saves_only_complete_positions(model, cold, monkeypatch):
    be = ReferenceBackend(model, context_length=128)
    s = be.start(P, GREEDY, 20, set())
    got = [next(s), next(s)]                   # KV written for P + got[:1]
    real = be.rm.ffn_norm_gate_up_silu

    def boom(x, layer):
        if layer == 1:                         # layer 0 of this step already wrote its KV
            raise KeyboardInterrupt
        return real(x, layer)

    monkeypatch.setattr(be.rm, "ffn_norm_gate_up_silu", boom)
    with pytest.raises(KeyboardInterrupt):
        next(s)
    monkeypatch.undo()
    s.cancel()
    list(s)
    [entry] = be.prefix_cache._entries
    assert entry.ids == tuple(P + got[:1])
    assert run(be, P + got + [7]) == (cold(P + got + [7]), len(P) + 1)


def test_eviction_under_a_tiny_budget(model, cold):
    per_token = ReferenceBackend(model, context_length=128, prefix_cache_gb=0).rm.kv_bytes(1)
    be = ReferenceBackend(model, context_length=128, prefix_cache_gb=50 * per_token / 1e9)
    a, b = P + [1], [90] + P
    run(be, a)                                 # 38 positions cached
    run(be, b)                                 # another 38: a is evicted
    assert be.prefix_cache.stats["entries"] == 1
    assert run(be, a) == (cold(a), 0)          # and now b is evicted
    run(be, list(range(100, 160)), 4)          # 63 positions: over the budget, not stored
    assert be.prefix_cache.stats["entries"] == 1 and run(be, a)[1] == len(a) - 1


def test_budget_zero_and_bad_budgets(model):
    be = ReferenceBackend(model, context_length=128, prefix_cache_gb=0)
    run(be, P)
    assert run(be, P)[1] == 0 and be.prefix_cache.stats["entries"] == 0
    for bad in (-1, float("nan"), float("inf"), "1", True):
        with pytest.raises(InputError, match="prefix_cache_gb"):
            ReferenceBackend(model, context_length=128, prefix_cache_gb=bad)
    with pytest.raises(InputError, match="prefix_cache_gb"):
        Engine(model, backend="reference", prefix_cache_gb=-2)


def test_logits_ignore_the_cache(model):
    be = ReferenceBackend(model, context_length=128)
    run(be, P)
    lookups = be.prefix_cache.stats["lookups"]
    fresh = ReferenceBackend(model, context_length=128, prefix_cache_gb=0).logits(P + [1])
    assert (be.logits(P + [1]) == fresh).all()
    assert be.prefix_cache.stats["lookups"] == lookups


def test_cancel_during_prefill_stops_between_chunks(model, cold):
    # a server cancels a request whose client left: the prefill stops at the next chunk
    # (token by token here), and the positions it ran are kept for reuse
    be = ReferenceBackend(model, context_length=128, batch_prefill=False)
    s = be.start(P, GREEDY, 8, set())
    real, calls = be.rm.forward, []

    def forward(ids, **kw):
        calls.append(len(ids))
        if len(calls) == 5:
            s.cancel()                         # (the server's thread, mid-prefill)
        return real(ids, **kw)

    be.rm.forward = forward
    assert list(s) == [] and s.finish_reason == "cancelled"
    assert calls == [1] * 5                    # not the 30 positions of the prompt
    [entry] = be.prefix_cache._entries
    assert entry.ids == tuple(P[:5])
    del be.rm.forward
    assert run(be, P) == (cold(P), 5)
