"""The sampling algorithm (kogcupy.reference.sampling): Philox KAT, filters on constructed logits,
repetition penalty, seeded determinism, and sampled frequencies against sampling_probs."""
from __future__ import annotations

import numpy as np
import pytest

from kogcupy.errors import InputError
from kogcupy.reference.sampling import (apply_repetition_penalty, descending_order, gumbel_noise,
                                        philox4x32_10, philox_uniform, sample, sampling_probs)
from kogcupy.sampling_params import SamplingParams as SP


# --------------------------------------------------------------------------- Philox
@pytest.mark.parametrize("ctr, key, expected", [
    # Random123 kat_vectors, philox4x32_10
    ([0, 0, 0, 0], [0, 0], [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]),
    ([0xffffffff] * 4, [0xffffffff] * 2, [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]),
    ([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0],
     [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]),
])
def test_philox_known_answers(ctr, key, expected):
    assert philox4x32_10(ctr, key).tolist() == expected


def test_philox_uniform_definition_and_vectorisation():
    seed = (0xDEADBEEF << 32) | 0x12345678
    ids = np.arange(1000)
    u = philox_uniform(seed, 7, ids)
    assert u.shape == (1000,) and u.dtype == np.float32 and u.min() > 0.0 and u.max() < 1.0
    out = philox4x32_10([7, 5, 0, 0], [0x12345678, 0xDEADBEEF])      # ids 20..23
    for j in range(4):
        assert u[20 + j] == ((int(out[j]) >> 9) + 0.5) * 2.0 ** -23
    assert philox_uniform(0, 0, [0])[0] == ((0x6627e8d5 >> 9) + 0.5) / 2 ** 23
    assert abs(u.mean() - 0.5) < 0.03
    assert not np.array_equal(u, philox_uniform(seed, 8, ids))        # a new draw each step
    g = gumbel_noise(seed, 7, ids)
    assert g.dtype == np.float32 and np.array_equal(g, -np.log(-np.log(u)))
    assert abs(float(g.mean()) - 0.5772) < 0.1                        # Euler-Mascheroni


def test_philox_uniform_any_ids_match_one_counter_each():
    # four ids share a counter (id >> 2); any order, repeats and shape give each id its own word
    seed, step = (1 << 40) | 12345, 9
    ids = np.array([[7, 3, 1000003, 7], [4, 5, 6, 0]], dtype=np.int64)
    u = philox_uniform(seed, step, ids)
    assert u.shape == ids.shape
    for i, v in np.ndenumerate(ids):
        w = philox4x32_10([step, int(v) >> 2, 0, 0], [seed & 0xFFFFFFFF, seed >> 32])[int(v) & 3]
        assert u[i] == ((int(w) >> 9) + 0.5) * 2.0 ** -23, (i, v)
    assert u[0, 0] == u[0, 3] and philox_uniform(seed, step, [4, 5])[1] == u[1, 1]


# --------------------------------------------------------------------------- filters
def test_greedy_argmax_lowest_index_wins_ties():
    logits = np.array([1.0, 3.0, -2.0, 3.0, 0.5], dtype=np.float32)
    assert sample(logits, SP(), step=0) == 1
    assert sample(logits, SP(), step=5) == 1
    np.testing.assert_array_equal(sampling_probs(logits, SP()), [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(descending_order(logits), [1, 3, 0, 4, 2])


def test_repetition_penalty_rule():
    logits = np.array([2.0, -2.0, 4.0, -1.0, 0.0], dtype=np.float32)
    out = apply_repetition_penalty(logits, 2.0, [0, 1, 1, 1, 4])   # distinct ids, applied once
    np.testing.assert_allclose(out, [1.0, -4.0, 4.0, -1.0, 0.0])
    np.testing.assert_array_equal(logits, [2.0, -2.0, 4.0, -1.0, 0.0])   # input untouched
    np.testing.assert_allclose(apply_repetition_penalty(logits, 0.5, [2, 3]),
                               [2.0, -2.0, 8.0, -0.5, 0.0])
    # penalty changes the greedy choice: 2 (4.0) -> penalised 1.6 < 2.0 of token 0
    assert sample(logits, SP(repetition_penalty=2.5), 0, prev_ids=[2]) == 0
    assert sample(logits, SP(repetition_penalty=1.0), 0, prev_ids=[2]) == 2


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_top_k_mask():
    logits = np.array([0.0, 5.0, 1.0, 4.0, 3.0, 2.0], dtype=np.float32)
    p = sampling_probs(logits, SP(temperature=1.0, top_k=3))
    kept = [1, 3, 4]
    assert set(np.flatnonzero(p)) == set(kept)
    np.testing.assert_allclose(p[kept], softmax(logits[kept]), rtol=1e-6)
    # top_k >= vocab or 0: everything
    assert np.count_nonzero(sampling_probs(logits, SP(temperature=1.0, top_k=6))) == 6
    assert np.count_nonzero(sampling_probs(logits, SP(temperature=1.0, top_k=0))) == 6
    assert SP(temperature=1.0, top_k=-1) == SP(temperature=1.0, top_k=0)    # -1: off too
    # ties at the boundary: lower id kept
    tied = np.array([1.0, 2.0, 2.0, 2.0], dtype=np.float32)
    assert np.flatnonzero(sampling_probs(tied, SP(temperature=1.0, top_k=2))).tolist() == [1, 2]


def test_top_p_mask():
    probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15], dtype=np.float64)
    logits = np.log(probs).astype(np.float32)
    order = [1, 3, 4, 2, 0]                           # cumulative .4 .7 .85 .95 1.0
    for top_p, n in [(0.3, 1), (0.4, 1), (0.41, 2), (0.7, 2), (0.75, 3), (0.9, 4), (0.96, 5)]:
        p = sampling_probs(logits, SP(temperature=1.0, top_p=top_p))
        kept = sorted(order[:n])
        assert np.flatnonzero(p).tolist() == kept, top_p
        np.testing.assert_allclose(p[kept], probs[kept] / probs[kept].sum(), rtol=1e-5)
    # a tiny top_p still keeps one token
    assert np.flatnonzero(sampling_probs(logits, SP(temperature=1.0, top_p=1e-9))).tolist() == [1]


def test_min_p_mask_and_temperature():
    probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    logits = np.log(probs).astype(np.float32)
    p = sampling_probs(logits, SP(temperature=1.0, min_p=0.3))     # keep p >= 0.12
    assert np.flatnonzero(p).tolist() == [1, 3, 4]
    p = sampling_probs(logits, SP(temperature=1.0, min_p=0.75))    # keep p >= 0.3
    assert np.flatnonzero(p).tolist() == [1, 3]
    np.testing.assert_allclose(p[[1, 3]], [4 / 7, 3 / 7], rtol=1e-5)
    # temperature divides the logits before softmax
    p = sampling_probs(logits, SP(temperature=0.5))
    np.testing.assert_allclose(p, probs ** 2 / (probs ** 2).sum(), rtol=1e-5)


def test_filters_compose_in_spec_order():
    # top_k first (3 tokens), softmax over those, top_p over the renormalised set, then min_p.
    logits = np.log(np.array([0.3, 0.25, 0.2, 0.15, 0.1])).astype(np.float32)
    p = sampling_probs(logits, SP(temperature=1.0, top_k=3, top_p=0.6))
    # over the top 3: .4 .333 .267 -> cumulative .4 .733: 2 tokens
    assert np.flatnonzero(p).tolist() == [0, 1]
    p = sampling_probs(logits, SP(temperature=1.0, top_k=3, min_p=0.7))   # >= .28 of top-3 set
    assert np.flatnonzero(p).tolist() == [0, 1]


def test_draw_rule_is_gumbel_max_over_kept_ids():
    probs = np.array([0.1, 0.6, 0.3, 0.004])
    logits = np.log(probs).astype(np.float32)
    for params in (SP(temperature=0.5, seed=3), SP(temperature=1.0, top_k=3, seed=3)):
        kept = np.arange(4) if params.top_k == 0 else np.arange(3)
        for step in range(200):
            s = logits[kept] * np.float32(1.0 / params.temperature) + gumbel_noise(3, step, kept)
            assert sample(logits, params, step) == kept[int(np.argmax(s))]
    # ties on the score go to the lower id; a filtered id never wins, however large its noise
    tie = np.array([2.0, 2.0], dtype=np.float32)
    assert sample(tie, SP(temperature=1e-30, seed=1), 0) == 0
    assert all(sample(logits, SP(temperature=1.0, top_k=1, seed=9), st) == 1 for st in range(50))


def test_seeded_determinism():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(1000).astype(np.float32) * 3
    params = SP(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, repetition_penalty=1.2,
                seed=1234)
    a = [sample(logits, params, s, prev_ids=[1, 2, 3]) for s in range(64)]
    b = [sample(logits, params, s, prev_ids=[1, 2, 3]) for s in range(64)]
    c = [sample(logits, SP(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01,
                           repetition_penalty=1.2, seed=1235), s, prev_ids=[1, 2, 3])
         for s in range(64)]
    assert a == b and a != c
    assert len(set(a)) > 5


# chi-square critical values at alpha = 1e-3 (df -> x), for when scipy is missing
_CHI2_CRIT_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322,
                  8: 26.124, 9: 27.877}


@pytest.mark.parametrize("params", [
    SP(temperature=1.0, seed=11),
    SP(temperature=0.7, top_k=8, seed=12),
    SP(temperature=1.3, top_p=0.8, seed=13),
    SP(temperature=1.0, min_p=0.05, repetition_penalty=1.3, seed=14),
])
def test_sampled_frequencies_follow_sampling_probs(params):
    rng = np.random.default_rng(5)
    logits = (rng.standard_normal(10) * 1.5).astype(np.float32)
    prev = [0, 3]
    probs = sampling_probs(logits, params, prev)
    assert abs(probs.sum() - 1.0) < 1e-9
    n = 20000
    draws = np.array([sample(logits, params, s, prev) for s in range(n)])
    counts = np.bincount(draws, minlength=10)
    assert np.all(counts[probs == 0] == 0)                       # filtered tokens never drawn
    support = probs > 0
    expected = probs[support] * n
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    if df == 0:
        return
    try:
        from scipy.stats import chi2
        crit = float(chi2.ppf(1 - 1e-3, df))
    except ImportError:
        if df not in _CHI2_CRIT_001:
            pytest.skip(f"no tabulated chi-square value for df={df} and scipy is missing")
        crit = _CHI2_CRIT_001[df]
    assert stat < crit, (stat, crit, counts, expected)


def test_invalid_params_are_input_errors():
    for kw in (dict(temperature=-1), dict(top_p=0.0), dict(top_k=-3), dict(min_p=1.0),
               dict(repetition_penalty=0.0)):
        with pytest.raises(InputError):
            SP(**kw)


def test_extreme_temperatures_stay_finite():
    logits = np.array([1.0, 3.0, 2.0, 3.0], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        np.testing.assert_allclose(sampling_probs(logits, SP(temperature=1e-300)),
                                   [0, 0.5, 0, 0.5])
        np.testing.assert_allclose(sampling_probs(logits, SP(temperature=1e30)), [0.25] * 4)
        assert sample(logits, SP(temperature=1e-45, seed=1), 0) in (1, 3)


def test_chi2_survival_without_scipy():
    # tests/chi2.py replaces scipy in the GPU tests (no extra installs scipy)
    import math

    from chi2 import chi2_sf, chisquare_pvalue
    for df, crit in _CHI2_CRIT_001.items():
        assert chi2_sf(crit, df) == pytest.approx(1e-3, rel=2e-3), df
    for x in (0.1, 3.0, 40.0):
        assert chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-9)
    assert chi2_sf(150.0, 100) == pytest.approx(9.0393e-4, rel=1e-4)   # numeric integral
    assert chisquare_pvalue([10, 10, 10], [10, 10, 10]) == 1.0
