"""CPU: the tensor-parallel partition (kogcupy/gpu/tensor_parallel.py, placement with ranks).

The shards of every rank, put back together, must be exactly the whole model, and one rank's
share run through NumPy must give that rank's partial sums: the sum over ranks of the o_proj
and down partials equals the whole model's product (what the in-kernel all-reduce computes).
"""
from __future__ import annotations

import numpy as np
import pytest

from kogcupy.gpu import tensor_parallel as tp
from kogcupy.model.config import ModelConfig
from kogcupy.errors import InputError
from kogcupy.gpu.placement import place
from kogcupy.model.random_weights import shape_config


def cfg_of(n_heads=8, n_kv=2, hd=16, hidden=64, ffn=128, vocab=101, arch="qwen2"):
    return ModelConfig(arch=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                       n_layers=2, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd,
                       rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=256,
                       tie_word_embeddings=False)


def device_layout_arrays(cfg, rng):
    L, h, f, V = cfg.n_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {"wqkv": r(L, cfg.qkv_dim, h), "bqkv": r(L, cfg.qkv_dim), "wo": r(L, h, cfg.q_dim),
            "w_gate_up": r(L, f, 2, h), "w_down": r(L, h, f), "lm_head": r(V, h),
            "embed": r(V, h), "rope_cos": r(8, cfg.head_dim // 2)}


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("n_kv", [2, 8])
def test_shards_reassemble_the_model(n, n_kv):
    cfg = cfg_of(n_kv=n_kv)
    rng = np.random.default_rng(n * 10 + n_kv)
    a = device_layout_arrays(cfg, rng)
    shards = [tp.shard(cfg, a, r, n) for r in range(n)]
    loc = tp.local_config(cfg, n)
    hd, hq = cfg.head_dim, cfg.n_heads // n
    for r, s in enumerate(shards):
        assert s["wqkv"].shape == (2, loc.qkv_dim, 64) and s["wo"].shape == (2, 64, loc.q_dim)
        assert s["w_gate_up"].shape == (2, loc.intermediate_size, 2, 64)
        np.testing.assert_array_equal(s["embed"], a["embed"])
        # q rows of rank r are heads r*hq..; its k/v rows are the kv heads those q heads read
        q = s["wqkv"][:, :loc.q_dim]
        np.testing.assert_array_equal(q, a["wqkv"][:, r * hq * hd:(r + 1) * hq * hd])
        for j, g in enumerate(tp.kv_heads(cfg, r, n)):
            assert all(h // cfg.gqa_group == g for h in range(r * hq, (r + 1) * hq)
                       if (h - r * hq) // loc.gqa_group == j)
            k = s["wqkv"][:, loc.q_dim + j * hd:loc.q_dim + (j + 1) * hd]
            np.testing.assert_array_equal(k, a["wqkv"][:, cfg.q_dim + g * hd:cfg.q_dim + (g + 1) * hd])
        np.testing.assert_array_equal(s["bqkv"], a["bqkv"][:, tp.qkv_rows(cfg, r, n)])
    cat = lambda k, ax: np.concatenate([s[k] for s in shards], axis=ax)  # noqa: E731
    np.testing.assert_array_equal(cat("wo", 2), a["wo"])
    np.testing.assert_array_equal(cat("w_gate_up", 1), a["w_gate_up"])
    np.testing.assert_array_equal(cat("w_down", 2), a["w_down"])
    np.testing.assert_array_equal(cat("lm_head", 0), a["lm_head"])
    if n_kv == 2 and n > 2:              # replicated kv heads: ranks sharing one hold equal rows
        assert loc.n_kv_heads == 1 and loc.gqa_group == hq
        assert tp.kv_heads(cfg, 0, n) == tp.kv_heads(cfg, 1, n) == [0]


def test_partials_sum_to_the_whole_product():
    cfg = cfg_of(n_kv=2)
    rng = np.random.default_rng(3)
    a = device_layout_arrays(cfg, rng)
    attn = rng.standard_normal(cfg.q_dim).astype(np.float32)
    act = rng.standard_normal(cfg.intermediate_size).astype(np.float32)
    for n in (2, 4):
        shards = [tp.shard(cfg, a, r, n) for r in range(n)]
        hq = cfg.q_dim // n
        f = cfg.intermediate_size // n
        o = sum(s["wo"][0] @ attn[r * hq:(r + 1) * hq] for r, s in enumerate(shards))
        d = sum(s["w_down"][0] @ act[r * f:(r + 1) * f] for r, s in enumerate(shards))
        np.testing.assert_allclose(o, a["wo"][0] @ attn, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(d, a["w_down"][0] @ act, rtol=1e-4, atol=1e-4)


def test_placement_per_rank():
    cfg = cfg_of(vocab=101)
    n, blocks = 4, 6
    loc = tp.local_config(cfg, n)
    lm = []
    for r in range(n):
        pl = place(loc, blocks, 64, rank=r, world_size=n)
        part = pl.partition
        assert part[0, 0] == 0 and part[-1, 1] == loc.qkv_dim            # local qkv rows
        assert part[-1, 5] == loc.intermediate_size                      # local FFN units
        assert part[-1, 3] == part[-1, 7] == cfg.hidden_size             # whole hidden rows
        lm.append((part[0, 8], part[-1, 9]))
        assert np.all(part[1:, 8] == part[:-1, 9])                       # contiguous
    assert lm[0][0] == 0 and lm[-1][1] == 101
    assert all(lm[i][1] == lm[i + 1][0] for i in range(n - 1))           # global vocab ids
    for r in range(n):                                # dynamic tails stay inside the slice
        pl = place(loc, blocks, 64, rank=r, world_size=n, dyn_permille=100)
        v0, v1 = tp.vocab_range(cfg, r, n)
        assert pl.partition[0, 8] == v0 and pl.partition[-1, 9] == pl.lm_dyn_begin
        assert v0 < pl.lm_dyn_begin < pl.lm_dyn_end == v1
        assert pl.producers["lm"] == blocks
    with pytest.raises(ValueError, match="rows of every stage in every block"):
        place(loc, 40, 64, rank=0, world_size=n)                       # 32 FFN units < 40


def test_largest_grid_for_a_small_model():
    from kogcupy.gpu.placement import max_tp_blocks
    cfg = cfg_of(vocab=101)
    loc = tp.local_config(cfg, 4)
    n = max_tp_blocks(loc, 4, dyn_permille=100)
    assert n == 23                    # 25 vocabulary rows a rank, 2 of them in the dynamic tail
    for r in range(4):
        place(loc, n, 64, rank=r, world_size=4, dyn_permille=100)
    with pytest.raises(ValueError):
        place(loc, n + 1, 64, rank=0, world_size=4, dyn_permille=100)


def test_bad_splits_are_refused_with_a_reason():
    with pytest.raises(InputError, match="does not divide the model's 9 attention heads"):
        tp.check(shape_config("smollm2-135m"), 2)
    with pytest.raises(InputError, match="KV heads"):
        tp.check(cfg_of(n_heads=12, n_kv=3), 4)
    with pytest.raises(InputError, match="FFN width"):
        tp.check(cfg_of(ffn=72), 2)
    with pytest.raises(InputError, match="1 to 8"):
        tp.check(cfg_of(), 16)
    for name in ("llama-3.2-1b", "qwen3-1.7b"):
        for n in (1, 2, 4, 8):
            tp.check(shape_config(name), n)


# ---- the whole tensor-parallel forward in NumPy: the shards through the reference stages ----
def _device_layout(cfg, w):
    """Packed (reference) arrays -> the monokernel's layout that tp.shard() splits."""
    L, f, h = cfg.n_layers, cfg.intermediate_size, cfg.hidden_size
    out = dict(w)
    out["w_gate_up"] = w["w_gate_up"].reshape(L, 2, f, h).transpose(0, 2, 1, 3)   # (L, f, 2, h)
    return out


def _packed_layout(loc, s):
    L, f, h = loc.n_layers, loc.intermediate_size, loc.hidden_size
    out = dict(s)
    out["w_gate_up"] = np.ascontiguousarray(s["w_gate_up"].transpose(0, 2, 1, 3)).reshape(L, 2 * f, h)
    return out


def tp_forward(cfg, weights, ids, n):
    """Logits of every position, each rank running the reference stages on its share and the
    o_proj / down partials summed over ranks (what the monokernel's all-reduce computes)."""
    from kogcupy.reference.backend import ReferenceModel, rmsnorm
    loc = tp.local_config(cfg, n)
    full = _device_layout(cfg, weights)
    ranks = [ReferenceModel(loc, _packed_layout(loc, tp.shard(cfg, full, r, n)), 64)
             for r in range(n)]
    x = weights["embed"][np.asarray(ids)].astype(np.float32)
    for layer in range(cfg.n_layers):
        part = []
        for m in ranks:
            attn = m.attention(m.attn_norm_qkv(x, layer), layer)
            part.append(attn @ m.w["wo"][layer].T)
        x = x + sum(part)
        part = [m.ffn_norm_gate_up_silu(x, layer) @ m.w["w_down"][layer].T for m in ranks]
        x = x + sum(part)
    xn = rmsnorm(x, cfg.rms_norm_eps)
    return np.concatenate([xn @ m.w["lm_head"].T for m in ranks], axis=1)


@pytest.mark.parametrize("arch,n_kv,n", [("qwen2", 2, 2), ("qwen2", 2, 4), ("qwen3", 2, 4),
                                          ("qwen3", 8, 8), ("llama", 4, 2)])
def test_tensor_parallel_forward_equals_the_whole_model(arch, n_kv, n):
    from kogcupy.model.random_weights import random_packed_weights
    from kogcupy.reference.backend import ReferenceModel
    cfg = cfg_of(arch=arch, n_kv=n_kv, vocab=101)
    w = random_packed_weights(cfg, seed=5, dtype="float32", rope_positions=64)
    ids = np.random.default_rng(6).integers(0, cfg.vocab_size, 12)
    want = ReferenceModel(cfg, w, 64).forward(ids, all_logits=True)
    got = tp_forward(cfg, w, ids, n)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_backends_share_the_launch_protocol():
    # start() / the logits checks / the watchdog wait are the one-launch base's, on one GPU
    # and over several; run here with the GPU side faked (host-mapped words as numpy arrays)
    from types import SimpleNamespace

    from kogcupy.errors import DeviceError
    from kogcupy.gpu.monokernel import MonokernelBackend, _OneLaunchBackend
    from kogcupy.gpu.multigpu import TensorParallelBackend
    from kogcupy.sampling_params import SamplingParams
    assert TensorParallelBackend.start is MonokernelBackend.start is _OneLaunchBackend.start
    for cls in (MonokernelBackend, TensorParallelBackend):
        b = object.__new__(cls)
        b.prefill = None                # one GPU without batched prefill: the plain launch
        ctl, toks = np.zeros(4, np.uint32), np.zeros(16, np.int32)
        stream = SimpleNamespace(done=False, synchronize=lambda: None)

        def launch(ids, params, max_new, eos, all_logits):
            toks[:3] = [7, 8, 9]
            ctl[0], ctl[1] = 3, 2                   # three tokens, finish "length"
            stream.done = True
            return 0.0
        b.cfg, b.context_length, b.watchdog_s, b._active = cfg_of(vocab=101), 8, 0.2, None
        b._ctl, b._host_tokens = SimpleNamespace(u32=ctl), SimpleNamespace(i32=toks)
        b._stream, b._wait_idle, b._launch = stream, lambda: None, launch
        s = b.start([1, 2], SamplingParams(), 3, set())
        assert list(s) == [7, 8, 9] and s.finish_reason == "length" and b._active is s
        with pytest.raises(InputError, match="exceed the context length"):
            b._check_logits_request(list(range(9)))
        stream.done = False
        with pytest.raises(DeviceError, match="did not finish"):
            b._sync_with_watchdog()


def test_tensor_parallel_start_prefills_then_launches_at_the_last_prompt_token():
    # the prefill runs on the stream's first __next__, then every rank's kernel starts at the
    # last prompt token -- without cancelling the request that asked for it; a cancel during
    # the prefill launches nothing. GPU side faked.
    from types import SimpleNamespace

    from kogcupy.gpu.multigpu import TensorParallelBackend
    from kogcupy.sampling_params import SamplingParams
    for stop_at in (None, 2):
        b = object.__new__(TensorParallelBackend)
        calls = []
        ctl, toks = np.zeros(4, np.uint32), np.zeros(16, np.int32)
        stream = SimpleNamespace(done=False, synchronize=lambda: None)

        def run(ids, start, end, should_stop=None):
            calls.append(("prefill", start, end))
            return end if stop_at is None else stop_at

        def fire_all(ids, params, max_new, eos, all_logits, logits_outs=None, start_pos=0):
            calls.append(("launch", start_pos))
            toks[:2] = [5, 6]
            ctl[0], ctl[1] = 2, 2                   # two tokens, finish "length"
            stream.done = True
            return 0.0
        b.prefill = SimpleNamespace(run=run)
        b.cfg, b.context_length, b.watchdog_s, b._active = cfg_of(vocab=101), 16, 0.2, None
        b._ctl, b._host_tokens = SimpleNamespace(u32=ctl), SimpleNamespace(i32=toks)
        b._stream, b._wait_idle, b._fire_all = stream, lambda: None, fire_all
        b._kv_ids, b._last_launch, b.prefix_cache = [], None, None
        s = b.start([1, 2, 3, 4], SamplingParams(), 2, set())
        assert calls == []                          # deferred to the first token
        if stop_at is None:
            assert list(s) == [5, 6] and s.finish_reason == "length"
            assert calls == [("prefill", 0, 3), ("launch", 3)]
        else:
            assert list(s) == [] and s.finish_reason == "cancelled"
            assert calls == [("prefill", 0, 3)]


class _FakeStream:
    """A GPU stream stand-in: done / synchronize for the token stream, `with` for copies."""
    done = False

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("backend", ["one GPU", "tensor parallel"])
def test_next_turn_prefills_only_what_is_new(backend, monkeypatch):
    # the cache (every rank's) holds the last request's prompt and its generated tokens but the
    # last: a next turn that extends them prefills from there (stream.cached_tokens says how
    # many were kept); a launch from position 0 overwrites the caches. GPU side faked: a cache
    # "position" holds the token id that ran there (+ the holder's number), so what a request
    # found in the caches can be read back.
    import contextlib
    from types import SimpleNamespace

    from kogcupy.gpu import monokernel, multigpu
    from kogcupy.gpu.multigpu import TensorParallelBackend
    from kogcupy.prefix_cache import PrefixCache
    from kogcupy.sampling_params import SamplingParams
    for mod in (monokernel, multigpu):
        monkeypatch.setattr(mod, "_cupy", lambda: SimpleNamespace(
            cuda=SimpleNamespace(Device=lambda i: contextlib.nullcontext())))
    cfg = cfg_of(vocab=101)
    calls = []
    ctl, toks = np.zeros(4, np.uint32), np.zeros(16, np.int32)
    stream = _FakeStream()

    def holder(h, i):                               # caches (L * KV, C, 1) of holder i
        k, v = np.full((4, 64, 1), -1.0), np.full((4, 64, 1), -1.0)
        h._kv_views, h.device_id, h.lcfg = (lambda: (k, v)), 0, cfg
        h.cache = lambda n: [int(x) - 1000 * i for x in k[0, :n, 0]]
        h.write = lambda ids, a, e: (k.__setitem__((slice(None), slice(a, e), 0),
                                                   np.asarray(ids[a:e]) + 1000 * i),
                                     v.__setitem__((slice(None), slice(a, e), 0), 0.0))
        return h

    def launched(ids, start_pos):
        calls.append(("launch", start_pos))
        toks[:3] = [7, 8, 9]
        for h in holders:                           # the prompt's last token, all but the last new one
            h.write(list(ids) + [7, 8], start_pos, len(ids) + 2)
        ctl[0], ctl[1] = 3, 2                       # three tokens, finish "length"
        stream.done = True
        return 0.0
    if backend == "one GPU":
        b = holder(object.__new__(monokernel.MonokernelBackend), 0)
        b._overflowed = lambda: False
        b._prepare = lambda ids, params, max_new, eos, all_logits, logits_out=None, start_pos=0: \
            (ids, start_pos)
        b._fire = lambda v: launched(*v)
        holders = [b]
    else:
        b = object.__new__(TensorParallelBackend)
        b._fire_all = lambda ids, params, max_new, eos, all_logits, logits_outs=None, \
            start_pos=0: launched(ids, start_pos)
        b.ranks = holders = [holder(SimpleNamespace(_stream=_FakeStream()), i) for i in range(2)]

    def prefill(ids, s0, s1, should_stop=None):
        calls.append(("prefill", s0, s1))
        for h in holders:
            h.write(ids, s0, s1)
        return s1
    b.prefill = SimpleNamespace(run=prefill)
    b.cfg = b.lcfg = cfg
    b.context_length, b.watchdog_s, b._active = 64, 0.2, None
    b._ctl, b._host_tokens = SimpleNamespace(u32=ctl), SimpleNamespace(i32=toks)
    b._stream, b._wait_idle = stream, lambda: None
    b._kv_ids, b._last_launch, b.prefix_cache = [], None, None
    turn1 = [1, 2, 3, 4, 5]
    s = b.start(turn1, SamplingParams(), 3, set())
    assert list(s) == [7, 8, 9] and s.cached_tokens == 0
    assert calls == [("prefill", 0, 4), ("launch", 4)]
    # turn 2: turn 1's prompt and answer, then new tokens; 7 + 8 are cached (9 never ran)
    calls.clear()
    turn2 = turn1 + [7, 8, 9, 20, 21]
    s = b.start(turn2, SamplingParams(), 3, set())
    assert list(s) == [7, 8, 9] and s.cached_tokens == 7
    assert calls == [("prefill", 7, 9), ("launch", 9)]
    # a prompt that parts from the cache at position 2
    calls.clear()
    s = b.start([1, 2, 30, 31], SamplingParams(), 3, set())
    assert list(s) == [7, 8, 9] and s.cached_tokens == 2
    assert calls == [("prefill", 2, 3), ("launch", 3)]
    # the same prompt again: all but its last token are kept, nothing is prefilled
    calls.clear()
    s = b.start([1, 2, 30, 31], SamplingParams(), 3, set())
    assert list(s) == [7, 8, 9] and s.cached_tokens == 3 and calls == [("launch", 3)]
    # a launch from position 0 (logits(), a build without prefill) leaves nothing to reuse,
    # nor does clear_prefix_cache()
    if backend == "one GPU":
        b.clear_prefix_cache()
    else:
        b._launch([1, 2, 30], SamplingParams(), 1, (), True)
    calls.clear()
    s = b.start([1, 2, 30, 31, 32], SamplingParams(), 3, set())
    assert list(s) == [7, 8, 9] and s.cached_tokens == 0
    assert calls == [("prefill", 0, 4), ("launch", 4)]
    # a prefill that fails: the request ends with its error (no earlier launch's token is read
    # after it) and the cache claims only the prefix it kept; the next request goes on from it
    run = b.prefill.run

    def fail(ids, s0, s1, should_stop=None):
        raise RuntimeError("prefill failed")
    b.prefill = SimpleNamespace(run=fail)
    s = b.start([1, 2, 30, 31, 32, 40, 41], SamplingParams(), 3, set())
    with pytest.raises(RuntimeError, match="prefill failed"):
        next(s)
    assert list(s) == [] and b._kv_ids == [1, 2, 30, 31, 32]
    b.prefill = SimpleNamespace(run=run)
    calls.clear()
    s = b.start([1, 2, 30, 31, 32, 40, 41], SamplingParams(), 3, set())
    assert list(s) == [7, 8, 9] and s.cached_tokens == 5
    assert calls == [("prefill", 5, 6), ("launch", 6)]
    b.clear_prefix_cache()
    calls.clear()
    s = b.start([1, 2, 30, 31, 32, 40, 41], SamplingParams(), 3, set())
    assert list(s) == [7, 8, 9] and s.cached_tokens == 0
    assert calls == [("prefill", 0, 6), ("launch", 6)]
    assert all(h.cache(8) == [1, 2, 30, 31, 32, 40, 41, 7] for h in holders)
    # with a store of earlier sequences: conversation B displaces A from the live caches, A's
    # next turn copies A back (every holder's K/V) and prefills only its new tokens
    b.prefix_cache = PrefixCache(1 << 20)
    a1 = [1, 2, 30, 31, 32, 40, 41]                 # (live: a1 + [7, 8])
    calls.clear()
    s = b.start([50, 51, 52], SamplingParams(), 3, set())
    assert list(s) == [7, 8, 9] and s.cached_tokens == 0
    assert b.prefix_cache.stats["entries"] == 1
    assert all(h.cache(5) == [50, 51, 52, 7, 8] for h in holders)
    calls.clear()
    a2 = a1 + [7, 8, 9, 60, 61]
    s = b.start(a2, SamplingParams(), 3, set())
    assert list(s) == [7, 8, 9] and s.cached_tokens == len(a1) + 2
    assert calls == [("prefill", 9, 11), ("launch", 11)]
    assert all(h.cache(13) == a2 + [7] for h in holders)
    assert b.prefix_cache.stats["entries"] == 2     # (B's sequence was saved before)


def test_a_stalled_kernel_fails_the_next_request_within_the_watchdog():
    # issue 15 item 9: after the stream watchdog fired, the next request waited on the stalled
    # stream for ever. GPU side faked: synchronize() on a running stream would never return.
    import time
    from types import SimpleNamespace

    from kogcupy.errors import DeviceError
    from kogcupy.gpu.monokernel import MonokernelBackend
    from kogcupy.gpu.multigpu import TensorParallelBackend
    from kogcupy.sampling_params import SamplingParams

    def never_returns():
        assert stream.done, "synchronize() on a stalled stream never returns"

    for cls in (MonokernelBackend, TensorParallelBackend):
        b = object.__new__(cls)
        b.prefill = None
        ctl, toks = np.zeros(4, np.uint32), np.zeros(16, np.int32)
        stream = SimpleNamespace(done=False, synchronize=never_returns)
        b.cfg, b.context_length, b.watchdog_s, b._active = cfg_of(vocab=101), 8, 0.2, None
        b._ctl, b._host_tokens, b._stream = SimpleNamespace(u32=ctl), SimpleNamespace(i32=toks), stream
        b._forget_kv = lambda: None
        b._launch = lambda *a, **kw: 0.0               # launched; the kernel then stalls
        s = b.start([1, 2], SamplingParams(), 3, set())
        with pytest.raises(DeviceError, match="no progress"):
            next(s)
        assert ctl[2] == 1                              # the kernel was asked to stop
        del b._launch                                   # the backend's own launch from here
        t0 = time.perf_counter()
        with pytest.raises(DeviceError, match="still running the previous monokernel launch"):
            b.start([1, 2], SamplingParams(), 3, set())
        assert time.perf_counter() - t0 < b.watchdog_s + 1.0
        if cls is MonokernelBackend:                    # one GPU, batched prefill: same wait
            b.prefill = object()
            with pytest.raises(DeviceError, match="still running"):
                b.start([1, 2], SamplingParams(), 3, set())
            stream.done = True                          # the kernel honoured the stop: runs
            s = b.start([1, 2], SamplingParams(), 3, set())
            assert b._active is s and s.finish_reason is None
