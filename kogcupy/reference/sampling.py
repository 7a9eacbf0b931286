"""The sampling algorithm every backend implements (the GPU sampler is checked against this).

One draw, in this order (spec; `step` = index of the generated token, 0 for the first):

    1. repetition penalty over the distinct ids of prompt + generated (HF/CTRL rule):
       l > 0 ? l / penalty : l * penalty
    2. temperature == 0 -> argmax (lowest index wins ties); done
    3. logits / temperature
    4. top_k: keep the k largest
    5. softmax (fp32)
    6. top_p: keep the smallest prefix of the descending-prob order whose cumulative >= top_p
       (at least one token)
    7. min_p: keep p >= min_p * p_max
    8. draw among the kept tokens by the Gumbel-max rule: the kept id with the largest
       logit / T + g(seed, step, id) (lowest id on ties), g = -log(-log(u)) with u from
       Philox4x32-10 (`gumbel_noise`). Its distribution is the renormalised kept probabilities.

"Descending-prob order" (steps 4, 6) is descending logit with ties broken by the lower token id.
With no top-k / top-p / min-p and no penalty every token is kept, so the draw is an argmax of
independent per-token scores: the GPU's LM head blocks draw it as they write their logits and
the sampler reduces their partials like a greedy argmax (no pass over the vocabulary).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ..sampling_params import SamplingParams

# ---------------------------------------------------------------------------------------------
# Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", Random123)
# ---------------------------------------------------------------------------------------------
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9      # golden ratio
PHILOX_W1 = 0xBB67AE85      # sqrt(3) - 1
_MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter, key) -> np.ndarray:
    """Philox4x32-10 block function, vectorised over a leading axis.

    counter: (..., 4) uint32-valued ints; key: (..., 2). Returns (..., 4) uint32.
    """
    c = np.asarray(counter, dtype=np.uint64) & _MASK32          # (..., 4)
    k = np.asarray(key, dtype=np.uint64) & _MASK32              # (..., 2)
    c0, c1, c2, c3 = (c[..., i].copy() for i in range(4))
    k0, k1 = k[..., 0].copy(), k[..., 1].copy()
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    for rnd in range(10):
        if rnd:
            k0 = (k0 + np.uint64(PHILOX_W0)) & _MASK32
            k1 = (k1 + np.uint64(PHILOX_W1)) & _MASK32
        p0 = m0 * c0                                            # exact: < 2**64
        p1 = m1 * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def philox_uniform(seed: int, step: int, ids) -> np.ndarray:
    """u in (0, 1) for token ids (array) at generated index `step`: key = (seed lo, seed hi),
    counter = (step, id >> 2, 0, 0), word id & 3 of the output; u = ((w >> 9) + 0.5) * 2**-23,
    exactly representable in fp32 and never 0 or 1. float32 (ids.shape)."""
    ids = np.asarray(ids, dtype=np.uint64)
    quads, where = np.unique(ids >> np.uint64(2), return_inverse=True)   # one counter: 4 ids
    ctr = np.zeros(quads.shape + (4,), dtype=np.uint64)
    ctr[:, 0] = step
    ctr[:, 1] = quads
    key = np.empty(quads.shape + (2,), dtype=np.uint64)
    key[:, 0] = seed & 0xFFFFFFFF
    key[:, 1] = (seed >> 32) & 0xFFFFFFFF
    out = philox4x32_10(ctr, key)                               # (quads, 4)
    w = out[where.reshape(ids.shape), (ids & np.uint64(3)).astype(np.int64)]
    return ((w >> np.uint32(9)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -23)


def gumbel_noise(seed: int, step: int, ids) -> np.ndarray:
    """g = -log(-log(u)) in fp32 for token ids (array) at generated index `step` (the GPU's
    kog_draw_score: the same fp32 operations)."""
    u = philox_uniform(seed, step, ids)
    return -np.log(-np.log(u))


def perturbed_scores(x: np.ndarray, inv_t, seed: int, step: int, ids) -> np.ndarray:
    """logit * (1 / T) + g in fp32, multiply and add each rounded (the GPU does not fuse them)."""
    with np.errstate(over="ignore"):
        return (x[ids] * np.float32(inv_t)).astype(np.float32) + gumbel_noise(seed, step, ids)


# ---------------------------------------------------------------------------------------------
# Filtering
# ---------------------------------------------------------------------------------------------
def apply_repetition_penalty(logits: np.ndarray, penalty: float, prev_ids: Iterable[int]
                             ) -> np.ndarray:
    """Copy of logits (vocab,) with the HF rule applied once per distinct id in prev_ids."""
    out = np.array(logits, dtype=np.float32, copy=True)         # (vocab,)
    if penalty == 1.0:
        return out
    ids = np.unique(np.fromiter(prev_ids, dtype=np.int64))
    if ids.size:
        sel = out[ids]
        p = np.float32(penalty)
        out[ids] = np.where(sel > 0, sel / p, sel * p)
    return out


def descending_order(logits: np.ndarray) -> np.ndarray:
    """Token ids by descending logit, ties by lower id (stable sort of -logits)."""
    return np.argsort(-logits, kind="stable")


def inv_temperature(params: SamplingParams) -> np.float32:
    """1 / T in fp32 (from float64, capped at the largest float: no inf for tiny T); the GPU
    gets this value (KogParams::inv_temperature). 0 when greedy."""
    if params.greedy:
        return np.float32(0.0)
    return np.float32(min(1.0 / params.temperature, float(np.finfo(np.float32).max)))


def _filtered_sorted(logits: np.ndarray, params: SamplingParams, prev_ids
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(order, p_kept) for a non-greedy draw: order (vocab,) token ids in descending-prob order,
    p_kept (vocab,) fp32 unnormalised probabilities along that order, 0 where filtered."""
    x = apply_repetition_penalty(logits, params.repetition_penalty, prev_ids)    # (vocab,)
    order = descending_order(x)                                 # (vocab,); same order as x / T
    xs = x[order]                                               # (vocab,) descending
    keep = np.ones(xs.shape[0], dtype=bool)
    if params.top_k and params.top_k < xs.shape[0]:
        keep[params.top_k:] = False
    # softmax of x / T as exp((x - x_max) * (1 / T)), like the GPU: no inf - inf for tiny T
    inv_t = inv_temperature(params)
    with np.errstate(over="ignore"):
        e = np.exp((xs - xs[0]) * inv_t)
    e = np.where(keep, e, np.float32(0)).astype(np.float32)
    p = e / e.sum(dtype=np.float32)                             # softmax over the kept set
    if params.top_p < 1.0:
        cum = np.cumsum(p, dtype=np.float32)
        n = int(np.searchsorted(cum, np.float32(params.top_p), side="left")) + 1
        keep[n:] = False                                        # first index with cum >= top_p
    if params.min_p > 0.0:
        keep &= p >= np.float32(params.min_p) * p[0]
    return order, np.where(keep, p, np.float32(0)).astype(np.float32)


def sampling_probs(logits: np.ndarray, params: SamplingParams, prev_ids=()) -> np.ndarray:
    """The distribution a draw follows: (vocab,) float64 probabilities indexed by token id,
    summing to 1 (one-hot at the argmax when greedy)."""
    logits = np.asarray(logits, dtype=np.float32)
    probs = np.zeros(logits.shape[0], dtype=np.float64)
    if params.greedy:
        x = apply_repetition_penalty(logits, params.repetition_penalty, prev_ids)
        probs[int(np.argmax(x))] = 1.0
        return probs
    order, p = _filtered_sorted(logits, params, prev_ids)
    probs[order] = p.astype(np.float64) / float(p.sum(dtype=np.float64))
    return probs


def sample(logits: np.ndarray, params: SamplingParams, step: int, prev_ids=()) -> int:
    """One token id from logits (vocab,) per the module docstring."""
    logits = np.asarray(logits, dtype=np.float32)
    if params.greedy:
        x = apply_repetition_penalty(logits, params.repetition_penalty, prev_ids)
        return int(np.argmax(x))
    order, p = _filtered_sorted(logits, params, prev_ids)
    kept = np.sort(order[p > 0])                                # ids, ascending
    x = apply_repetition_penalty(logits, params.repetition_penalty, prev_ids)
    s = perturbed_scores(x, inv_temperature(params), params.seed, step, kept)
    return int(kept[int(np.argmax(s))])                         # first (lowest id) on ties
