"""Tensor-parallel monokernel over 2, 3 and 4 ranks against the one-GPU monokernel (skipped
without a GPU). Run with `pytest -m multigpu`. A rank count above the GPUs present runs its
ranks on GPU 0 together (each kernel on its share of the multiprocessors, all at once): the
same kernels, exchanges and stop protocol, through one GPU's memory instead of NVLink.

The same random weights run on one GPU and split over N GPUs: greedy tokens must be identical
for >= 64 steps, teacher-forced logits within fp32-reordering tolerance (the o_proj / down sums
are split over ranks), every rank must hold bit-identical logits, and seeded sampling must
draw the same tokens at every TP size. Outputs are NaN-poisoned before each launch.
"""
from __future__ import annotations

import dataclasses

import time
from types import SimpleNamespace

import numpy as np
import pytest

from kogcupy.model.config import ModelConfig
from kogcupy.model.random_weights import random_packed_weights, shape_config
from kogcupy.reference import sampling as ref_sampling
from kogcupy.sampling_params import SamplingParams

pytestmark = pytest.mark.multigpu


def _n_gpus():
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001
        return 0


N_GPUS = _n_gpus()
if N_GPUS < 1:
    pytest.skip("needs CuPy and a GPU", allow_module_level=True)

from kogcupy.gpu.device_weights import DeviceModel  # noqa: E402
from kogcupy.gpu.monokernel import MonokernelBackend  # noqa: E402
from kogcupy.gpu.multigpu import TensorParallelBackend  # noqa: E402

TP_SIZES = [2, 4]
ODD_SIZES = [3]                                    # any count that divides the heads


def devices(n):
    """The GPU of each of n ranks: one each when there are enough, else all on GPU 0."""
    return None if n <= N_GPUS else [0] * n


def cfg_of(arch, vocab, hidden, ffn, layers, heads, kv, hd):
    return ModelConfig(arch=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                       n_layers=layers, n_heads=heads, n_kv_heads=kv, head_dim=hd,
                       rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048,
                       tie_word_embeddings=False)


FAMILIES = {
    # 8 q / 8 kv heads: KV heads split; odd vocabulary: uneven LM-head slices
    "llama-kv8": cfg_of("llama", 1001, 256, 704, 2, 8, 8, 32),
    # 8 q / 2 kv heads: at TP 4 each KV head is replicated on two ranks; q/k-norm
    "qwen3-kv2-hd128": cfg_of("qwen3", 1500, 512, 1024, 2, 8, 2, 128),
    # biases on q/k/v
    "qwen2-bias": cfg_of("qwen2", 1200, 384, 1536, 3, 4, 4, 64),
}
# 6 q / 3 kv heads: splits over 3 GPUs (SmolLM2-135M's 9 / 3 heads do too)
ODD = cfg_of("llama", 999, 384, 768, 2, 6, 3, 64)

_CACHE = {}


def pair(key, n, blocks=None):
    """(one-GPU backend, n-GPU backend) on the same random weights."""
    k = (key, n, blocks)
    if k not in _CACHE:
        cfg = ODD if key == "odd" else FAMILIES[key]
        w = random_packed_weights(cfg, seed=1, dtype="bfloat16", rope_positions=2048)
        m = SimpleNamespace(config=cfg, weights=w, dtype="bfloat16", tokenizer=None, path="random")
        one = _CACHE.get((key, 1, blocks))
        if one is None:
            one = MonokernelBackend(m, context_length=512, watchdog_s=30, blocks=blocks)
            _CACHE[(key, 1, blocks)] = one
        _CACHE[k] = (one, TensorParallelBackend(m, gpus=n, context_length=512, watchdog_s=30,
                                                blocks=blocks, devices=devices(n)))
    return _CACHE[k]


def greedy(b, ids, n, eos=()):
    s = b.start(ids, SamplingParams(), n, set(eos))
    return list(s), s.finish_reason


def prompt(cfg, n, seed):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, n).tolist()


def same_or_near_tie(one, ids, want, got, what):
    """The n-rank greedy tokens equal the one-GPU ones, or part only at a near-tie. One GPU
    adds x's parts as fixed point in L2 (2^-26 steps), tensor parallel adds the ranks' fp32
    partials in rank order: the rounding differs, so a sequence may part where the one-GPU
    logits' top two are within 1e-3 of the largest |logit| -- and nowhere else."""
    assert len(got) == len(want), (what, len(got), len(want))
    k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if k is None:
        return
    ref = one.logits(ids + want[:k])[-1]
    top2 = np.sort(ref)[-2:]
    margin = (top2[1] - top2[0]) / np.abs(ref).max()
    assert margin < 1e-3, f"{what} parts from one GPU at step {k}, top-2 margin {margin:.2e}"


@pytest.mark.parametrize("n", TP_SIZES)
@pytest.mark.parametrize("key", list(FAMILIES))
def test_greedy_identical_to_one_gpu(key, n):
    one, tp = pair(key, n)
    ids = prompt(one.cfg, 9, seed=n)
    want, r1 = greedy(one, ids, 80)
    got, r2 = greedy(tp, ids, 80)
    assert r1 == r2 == "length" and len(got) == 80
    same_or_near_tie(one, ids, want, got, f"{key} on {n} ranks")


@pytest.mark.parametrize("n", TP_SIZES)
def test_long_prompt_prefilled_on_the_ranks(n, monkeypatch):
    """A 300-token prompt (several prefill attention tiles, several decode attention chunks):
    every rank prefills its heads and FFN columns, the ranks exchange their o_proj / down
    partials (gather buffers NaN-poisoned), and the decode that follows gives one GPU's
    greedy tokens, or parts from them only at a near-tie."""
    one, tp = pair("qwen3-kv2-hd128", n)
    assert tp.prefill is not None
    ids = prompt(one.cfg, 300, seed=11)
    monkeypatch.setattr(tp.prefill, "capture_at_use", 1)     # capture at the size's first use
    want, r1 = greedy(one, ids, 24)
    got, r2 = greedy(tp, ids, 24)
    assert r1 == r2 == "length"
    assert tp.prefill.graphs is not None            # the ranks' 299 tokens ran as one graph
    assert (384, tp.prefill.pfs[0].attention) in tp.prefill.graphs
    same_or_near_tie(one, ids, want, got, f"a 300-token prompt on {n} ranks")


@pytest.mark.parametrize("n", TP_SIZES)
def test_next_turn_reuses_the_ranks_caches(n):
    """Turn 2 of a conversation (turn 1's prompt, its answer, new tokens): the ranks keep turn
    1's prompt and all but the last generated token and prefill only the rest; its greedy tokens
    are one GPU's on the whole turn-2 prompt from scratch (or part from them only at a near-tie)."""
    one, tp = pair("llama-kv8", n)
    turn1 = prompt(one.cfg, 150, seed=21)
    ans, r = greedy(tp, turn1, 16)
    assert r == "length"
    turn2 = turn1 + ans + prompt(one.cfg, 40, seed=22)
    next_turn_matches_one_gpu(one, tp, turn2, len(turn1) + 15, f"turn 2 on {n} ranks")


def next_turn_matches_one_gpu(one, tp, ids, cached, what):
    """16 greedy tokens of `ids` on `tp`, which must find `cached` of them in its caches, are
    one GPU's from scratch (or part from them only at a near-tie)."""
    s = tp.start(ids, SamplingParams(), 16, set())
    got = list(s)
    assert s.cached_tokens == cached, s.cached_tokens
    one.clear_prefix_cache()
    want, _ = greedy(one, ids, 16)
    same_or_near_tie(one, ids, want, got, what)


@pytest.mark.parametrize("n", TP_SIZES)
def test_an_earlier_conversation_comes_back_from_the_store(n):
    """Conversation B displaces A from the ranks' caches; A's next turn copies A's K/V back from
    the store (every rank's) and prefills only its new tokens: one GPU's greedy tokens on the
    whole prompt from scratch (or parting from them only at a near-tie)."""
    one, tp = pair("llama-kv8", n)
    assert tp.prefix_cache is not None and tp.prefix_cache.budget_bytes > 0
    a1, b1 = prompt(one.cfg, 120, seed=31), prompt(one.cfg, 90, seed=32)
    ans, _ = greedy(tp, a1, 8)
    greedy(tp, b1, 8)
    a2 = a1 + ans + prompt(one.cfg, 30, seed=33)
    next_turn_matches_one_gpu(one, tp, a2, len(a1) + 7, f"A's turn 2 from the store on {n} ranks")


def _bf16(a):
    return (np.asarray(a, np.uint16).astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("n", TP_SIZES)
def test_prefill_kv_matches_one_gpu(n):
    """Each rank's K/V of a 200-token prompt prefilled in 64-token chunks (later chunks at
    pos0 > 0, exchanges ordered across chunks) equal one GPU's prefill of the same kv heads
    within bf16 rounding. Both caches NaN-poisoned first."""
    import cupy
    from kogcupy.gpu.tensor_parallel import kv_heads
    one, tp = pair("qwen3-kv2-hd128", n)
    cfg, m = one.cfg, 199
    ids = prompt(cfg, m + 1, seed=5)
    for b in (one, tp):                             # (the backends are shared with other tests:
        b._settle()                                 #  their caches will not hold a request's)
        b._forget_kv()
    for b in [one] + tp.ranks:
        with cupy.cuda.Device(b.device_id), b._stream:   # (ordered before the prefill's kernels)
            b.k_cache.fill(0x7FC0)
            b.v_cache.fill(0x7FC0)
    assert one.prefill.run(ids, 0, m, chunk=64) == m
    assert tp.prefill.run(ids, 0, m, chunk=64) == m
    L, C, hd = cfg.n_layers, one.context_length, cfg.head_dim
    for which in ("k_cache", "v_cache"):
        want = _bf16(cupy.asnumpy(getattr(one, which))).reshape(L, -1, C, hd)[:, :, :m]
        assert np.isfinite(want).all()
        for r, rank in enumerate(tp.ranks):
            got = _bf16(cupy.asnumpy(getattr(rank, which))).reshape(L, -1, C, hd)[:, :, :m]
            for j, g in enumerate(kv_heads(cfg, r, n)):
                err = np.abs(got[:, j] - want[:, g]).max() / np.abs(want[:, g]).max()
                assert err < 2e-2, (which, r, g, err)


@pytest.mark.parametrize("n", TP_SIZES)
@pytest.mark.parametrize("key", list(FAMILIES))
def test_logits_match_one_gpu(key, n):
    one, tp = pair(key, n)
    ids = prompt(one.cfg, 40, seed=7 + n)
    want = one.logits(ids)
    got = tp.logits(ids)
    assert np.isfinite(got).all()
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 2e-3, err
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.97
    for r, other in enumerate(tp.last_logits_all_ranks[1:], 1):   # every rank agrees exactly
        assert other.tobytes() == got.tobytes(), f"rank {r} logits differ from rank 0"


@pytest.mark.parametrize("n", ODD_SIZES)
def test_three_gpus(n):
    one, tp = pair("odd", n)
    ids = prompt(one.cfg, 7, seed=13)
    same_or_near_tie(one, ids, greedy(one, ids, 64)[0], greedy(tp, ids, 64)[0], f"{n} ranks")
    ids = prompt(one.cfg, 30, seed=14)
    want, got = one.logits(ids), tp.logits(ids)
    assert np.abs(got - want).max() / np.abs(want).max() < 2e-3


def assert_draw_matches_reference(logits, params, step, prev, tok, tol=2e-3):
    """`tok`, drawn at generated index `step`, is the reference sampler's draw for `logits`, or
    within rounding of it (the GPU sums in another order): kept by the filters loosened by `tol`
    and scoring within `tol` (relative to the logits' scale) of the best kept score; greedy: the
    argmax, or a near-tie."""
    if ref_sampling.sample(logits, params, step, prev) == tok:
        return
    x = ref_sampling.apply_repetition_penalty(np.asarray(logits, np.float32),
                                              params.repetition_penalty, prev)
    if params.greedy:
        assert (x.max() - x[tok]) / np.abs(x).max() < 1e-3, (params, step, tok)
        return
    loose = dataclasses.replace(params, top_p=min(1.0, params.top_p + tol),
                                min_p=max(0.0, params.min_p - tol))
    order, p = ref_sampling._filtered_sorted(np.asarray(logits, np.float32), loose, prev)
    kept = np.sort(order[p > 0])
    assert tok in kept, (params, step, tok)
    inv_t = float(ref_sampling.inv_temperature(params))
    sc = ref_sampling.perturbed_scores(x, inv_t, params.seed, step, kept)
    assert sc.max() - sc[kept == tok][0] <= 2 * tol * np.abs(x).max() * inv_t, (params, step, tok)


@pytest.mark.parametrize("n", TP_SIZES)
def test_seeded_sampling_identical_across_tp_sizes(n):
    one, tp = pair("qwen3-kv2-hd128", n)
    ids = prompt(one.cfg, 12, seed=3)
    for params in (SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=1234),
                   SamplingParams(temperature=1.1, min_p=0.02, repetition_penalty=1.3, seed=99),
                   SamplingParams(repetition_penalty=1.5),       # greedy with a penalty
                   SamplingParams(temperature=1.0, seed=7)):     # drawn by the LM head's blocks
        a = list(one.start(ids, params, 96, set()))
        b = list(tp.start(ids, params, 96, set()))
        # the same random numbers and selection on every rank count: equal draws, or parting
        # only where fp32 rounding of the split sums (vs one GPU's fixed-point parts) moved a
        # near-tie of the draw's scores or a filter's boundary: where they part, logits that
        # agree, and each draw the reference sampler's for its own logits (up to rounding)
        assert len(a) == len(b) == 96, params
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if k is not None:
            seq = ids + a[:k]
            la, lb = one.logits(seq)[-1], tp.logits(seq)[-1]
            assert np.abs(la - lb).max() / np.abs(la).max() < 2e-3, (params, k)
            assert_draw_matches_reference(la, params, k, seq, a[k])
            assert_draw_matches_reference(lb, params, k, seq, b[k])


@pytest.mark.parametrize("n", TP_SIZES)
def test_many_blocks_and_few_blocks(n):
    # the default grid (one block per SM) and a small one: the row owners differ
    for blocks in (None, 9):
        one, tp = pair("llama-kv8", n, blocks)
        ids = prompt(one.cfg, 5, seed=11)
        same_or_near_tie(one, ids, greedy(one, ids, 64)[0], greedy(tp, ids, 64)[0],
                         f"{n} ranks, {blocks} blocks")


@pytest.mark.parametrize("n", TP_SIZES)
def test_all_ranks_stop_together(n):
    one, tp = pair("qwen2-bias", n)
    ids = prompt(one.cfg, 6, seed=5)
    ref, _ = greedy(one, ids, 40)
    eos = ref[17]
    got, reason = greedy(tp, ids, 40, eos=[eos])
    assert reason == "eos" and got == ref[:ref.index(eos) + 1]
    # cancel: rank 0 reads the flag and forwards it; no rank may wait for the others forever
    s = tp.start(ids, SamplingParams(), 400, set())
    first = [next(s) for _ in range(3)]
    s.cancel()
    rest = list(s)
    got = first + rest
    assert s.finish_reason == "cancelled" and got[:40] == ref[:len(got)]
    # the kernel reads the flag every step: a few tokens more (host polling latency), not 400
    assert len(rest) < 64, len(rest)
    # every rank stopped at the same step, on the cancel (finish code 4), and all GPUs are free;
    # the kernel may have run a few steps past the last token the stream yielded
    ends = {(int(r._ctl.u32[0]), int(r._ctl.u32[1])) for r in tp.ranks}
    assert len(ends) == 1, ends
    count, code = ends.pop()
    assert code == 4 and len(got) <= count < len(got) + 64, (count, len(got))
    assert tp._stream.done
    assert greedy(tp, ids, 40) == (ref, "length")          # and the next request runs
    t0 = time.perf_counter()
    tp._wait_idle()                               # every rank's kernel has ended
    assert time.perf_counter() - t0 < 10
    # and the next request on the same backend is right
    assert greedy(tp, ids, 40)[0] == ref


@pytest.mark.parametrize("name", ["qwen3-1.7b", "llama-3.2-1b"])
def test_real_shapes_match_one_gpu(name):
    # Full-size shapes, random bf16 weights. Splitting the o_proj / down sums over ranks
    # changes the rounding (one GPU: fixed-point residual sums with a part per block or pair; tensor
    # parallel: fp32 partials; a prompt's batched prefill splits its GEMMs' sums the same way),
    # so a greedy sequence may only part at a near-tie. The teacher-forced logits must agree to
    # TOL of the largest |logit|; two logits that each move by at most TOL swap only where the
    # one-GPU top two are within 2 TOL, so that is where the first differing step must be.
    import cupy
    TOL = 2e-3
    cfg = shape_config(name)
    with cupy.cuda.Device(0):
        dev = DeviceModel.random(cfg, "bfloat16", seed=2, rope_positions=1024)
        one = MonokernelBackend(device_model=dev, context_length=256, watchdog_s=60)
    ids = prompt(cfg, 16, seed=4)
    want, _ = greedy(one, ids, 64)
    seq = ids + want[:-1]
    ref = one.logits(seq)[len(ids) - 1:]                 # row i chose want[i]
    top2 = np.sort(ref, axis=1)[:, -2:]
    margin = (top2[:, 1] - top2[:, 0]) / np.abs(ref).max()
    for n in TP_SIZES:
        tp = TensorParallelBackend(device_model=dev, gpus=n, context_length=256, watchdog_s=60,
                                   devices=devices(n))
        got, reason = greedy(tp, ids, 64)
        assert reason == "length" and len(got) == 64
        lg = tp.logits(seq)[len(ids) - 1:]
        err = np.abs(lg - ref).max() / np.abs(ref).max()
        assert err < TOL, (n, err)
        k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        if k is not None:
            assert margin[k] < 2 * TOL, \
                f"TP {n} parts from one GPU at step {k}, margin {margin[k]:.2e} (logit error {err:.2e})"
        assert (lg.argmax(1) == ref.argmax(1)).mean() >= 0.95
        del tp


def test_warm_up_captures_every_size_on_the_ranks():
    """TensorParallelBackend.warm_up (a server's start) captures one multi-GPU graph per padded
    prompt size (the context's 512 positions: 4); a 200-token prompt then replays its size's
    graph at its first use and decodes one GPU's greedy tokens, or parts only at a near-tie."""
    from kogcupy.gpu import prefill
    one, tp = pair("qwen2-bias", 2)
    assert tp.warm_up() == 4
    assert sorted(rows for rows, _ in tp.prefill.graphs) == prefill.warm_up_sizes(512)[::-1]
    ids = prompt(one.cfg, 200, seed=21)
    tp.clear_prefix_cache()
    uses = dict(tp.prefill.uses)
    want, _ = greedy(one, ids, 16)
    got, _ = greedy(tp, ids, 16)
    assert tp.prefill.uses == uses                 # a replay: no kernel-by-kernel first use
    same_or_near_tie(one, ids, want, got, "a warmed 200-token prompt on 2 ranks")
