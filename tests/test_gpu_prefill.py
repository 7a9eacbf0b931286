"""GPU tests of the batched prefill and the prompt-prefix reuse (skipped without a GPU).

The prefill rounds GEMM inputs to bf16 (the monokernel keeps activations in fp32), so its
logits match the fp32 reference to ~1e-2 relative, like the monokernel's own. Greedy runs that
reuse a cached prefix are compared with cold runs of the same prompt.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kogcupy.errors import InputError
from kogcupy.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

from test_gpu_monokernel import FAMILIES, model, rel  # noqa: E402 -- skips without a GPU

from kogcupy.gpu.monokernel import MonokernelBackend  # noqa: E402
from kogcupy.reference.backend import ReferenceBackend  # noqa: E402

CHUNK = 64          # small chunks so that chunk - 1, chunk, chunk + 1 and many chunks are cheap


@pytest.mark.parametrize("key", list(FAMILIES))
@pytest.mark.parametrize("n", [1, CHUNK - 1, CHUNK, CHUNK + 1, 300])
def test_prefill_logits_match_reference(key, n):
    m = model(FAMILIES[key], seed=5)
    be = MonokernelBackend(m, context_length=1024)
    ids = np.random.default_rng(n).integers(0, m.config.vocab_size, n).tolist()
    got = be.prefill.logits(ids, chunk=CHUNK)
    assert got.shape == (n, m.config.vocab_size) and np.all(np.isfinite(got))
    ref = ReferenceBackend(m, context_length=1024).logits(ids)
    errs = [rel(got[i], ref[i]) for i in range(n)]
    assert max(errs) < 2e-2, (key, n, max(errs), int(np.argmax(errs)))


def test_prefill_long_prompt_and_simple_attention():
    """~3,000 tokens over several chunks (hd 128, GQA 3); every attention kernel this GPU has
    (warpgroup products on Hopper, mma.sync tiles, the portable one: the HIP path) gives the
    same logits."""
    cfg = dataclasses.replace(FAMILIES["llama-hd128-gqa3"], max_position_embeddings=4096)
    m = model(cfg, seed=6, rope_positions=3200)
    be = MonokernelBackend(m, context_length=3200)
    assert be.context_length == 3200
    with pytest.raises(InputError, match="exceed the context length"):
        be.prefill.logits([1] * 3201)
    ids = np.random.default_rng(7).integers(0, cfg.vocab_size, 3000).tolist()
    kinds = list(be.prefill.attention_kernels)
    assert kinds[-1] == "simple" and be.prefill.attention == kinds[0]
    import cupy as cp

    from kogcupy.gpu import kernels
    if (cp.cuda.Device().compute_capability == "90" and not kernels.is_hip()
            and kernels.nvrtc_version() >= kernels.WGMMA_MIN_NVRTC):
        assert kinds[0] == "ws", kinds          # an H100 / H200 runs the warpgroup kernel
    got = {}
    for kind in kinds:
        be.prefill.attention = kind
        got[kind] = be.prefill.logits(ids, chunk=1024)
    be.prefill.attention = kinds[0]
    fast, simple = got[kinds[0]], got["simple"]
    assert np.all(np.isfinite(fast))
    for kind in kinds[:-1]:
        errs = [rel(got[kind][i], simple[i]) for i in (0, 1, 1023, 1024, 2047, 2999)]
        assert max(errs) < 1e-2, (kind, errs)
    ref = ReferenceBackend(m, context_length=3200).logits(ids[:1100])
    errs = [rel(fast[i], ref[i]) for i in (0, 500, 1023, 1024, 1099)]
    assert max(errs) < 3e-2, errs


def _greedy_model(key="llama"):
    cfg = dataclasses.replace(FAMILIES[key], tie_word_embeddings=False)
    return model(cfg, seed=8, logit_scale=8.0)


def test_first_token_and_greedy_match_reference():
    m = _greedy_model("qwen3-qknorm-h896-gqa7-hd128")
    be = MonokernelBackend(m, context_length=1024, prefix_cache_gb=0)
    prompt = np.random.default_rng(9).integers(0, m.config.vocab_size, 200).tolist()
    s = be.start(prompt, SamplingParams(), 32, set())
    got = list(s)
    assert s.cached_tokens == 0
    ref = list(ReferenceBackend(m, context_length=1024).start(prompt, SamplingParams(), 32, set()))
    assert got == ref


def test_prefix_reuse_warm_equals_cold():
    m = _greedy_model()
    V = m.config.vocab_size
    rng = np.random.default_rng(10)
    system = rng.integers(0, V, 150).tolist()
    turn2 = system + rng.integers(0, V, 40).tolist()
    other = rng.integers(0, V, 120).tolist()
    cold = MonokernelBackend(m, context_length=1024, prefix_cache_gb=0)
    warm = MonokernelBackend(m, context_length=1024, prefix_cache_gb=1)

    def run(be, p):
        s = be.start(p, SamplingParams(), 24, set())
        return list(s), s.cached_tokens

    a, c = run(warm, system)
    assert c == 0 and a == run(cold, system)[0]
    a2, c = run(warm, system)                       # the same prompt again: all but the last
    assert c == len(system) - 1 and a2 == a
    t2, c = run(warm, turn2)                        # a longer prompt sharing the system part
    assert c == len(system) and t2 == run(cold, turn2)[0]
    o, c = run(warm, other)                         # unrelated: the live sequence is saved
    assert c == 0 and o == run(cold, other)[0]
    div = turn2[:100] + [(turn2[100] + 1) % V] + turn2[101:]   # diverges inside the prefix
    d, c = run(warm, div)
    assert c == 100 and d == run(cold, div)[0]
    assert warm.prefix_cache.stats["entries"] >= 1


def test_logits_between_requests_leave_no_stale_prefix():
    # teacher-forced logits overwrite the live cache: a later prompt is matched against what
    # they wrote (without a prefix cache) or the store (with one), never against the live
    # sequence of the request before them
    m = _greedy_model()
    V = m.config.vocab_size
    rng = np.random.default_rng(12)
    a = rng.integers(0, V, 100).tolist()
    forced = [(a[0] + 1) % V] + rng.integers(0, V, 59).tolist()
    cold = MonokernelBackend(m, context_length=1024, prefix_cache_gb=0)
    first = list(cold.start(a, SamplingParams(), 8, set()))
    turn2 = a + first
    fresh = MonokernelBackend(m, context_length=1024, prefix_cache_gb=0)
    want = list(fresh.start(turn2, SamplingParams(), 8, set()))   # (nothing cached)
    for gb in (0, 1):
        be = MonokernelBackend(m, context_length=1024, prefix_cache_gb=gb)
        assert list(be.start(a, SamplingParams(), 8, set())) == first
        be.logits(forced)
        s = be.start(turn2, SamplingParams(), 8, set())
        got = list(s)
        assert s.cached_tokens == (0 if gb == 0 else len(turn2) - 1)
        assert got == want


def test_graph_replays_match_kernel_by_kernel():
    """A chunk replays the captured graph of its padded size (prefill.GRAPH_STEP) at any
    position (its first position is read from device memory): the greedy tokens of a cold
    prompt and of one that reuses 40 cached positions (the same 384-row graph at position 40)
    equal those of a backend that launches kernel by kernel. A padded size's first chunk runs
    kernel by kernel; its second captures the graph (prefill.CAPTURE_AT_USE)."""
    m = _greedy_model("qwen3-qknorm-h896-gqa7-hd128")
    V = m.config.vocab_size
    rng = np.random.default_rng(13)
    a = rng.integers(0, V, 300).tolist()
    b = a[:40] + rng.integers(0, V, 320).tolist()
    graphed = MonokernelBackend(m, context_length=1024, prefix_cache_gb=1)
    eager = MonokernelBackend(m, context_length=1024, prefix_cache_gb=0)
    eager.prefill.graphs = None

    def run(be, p):
        s = be.start(p, SamplingParams(), 16, set())
        return list(s), s.cached_tokens

    ga, c = run(graphed, a)                          # prefill [0, 299): kernel by kernel
    assert c == 0
    assert graphed.prefill.graphs == {} and list(graphed.prefill.uses.values()) == [1]
    gb, c = run(graphed, b)                          # prefill [40, 359)
    assert c == 40
    kind = graphed.prefill.attention
    assert list(graphed.prefill.graphs) == [(384, kind)]   # one graph, replayed at position 40
    assert ga == run(eager, a)[0] and gb == run(eager, b)[0]
    assert eager.prefill.graphs is None


def test_long_chunk_runs_padded():
    """After a warm-up (warmed_long), a chunk longer than GRAPH_MAX runs kernel by kernel with
    its rows padded to GRAPH_STEP (a 2,100-token prompt: the prefill's 2,099 -> 2,176 rows, a
    shape the warm-up ran); the K and V of the prompt's positions (caches poisoned) and the
    greedy tokens are those of the same chunk at its exact size (no warm-up)."""
    from kogcupy.gpu import prefill
    m = model(dataclasses.replace(FAMILIES["llama"], tie_word_embeddings=False), seed=8,
              logit_scale=8.0, rope_positions=4096)
    ids = np.random.default_rng(23).integers(0, m.config.vocab_size, 2100).tolist()
    assert prefill.chunk_rows(2099, 0, 4096) == 2176 and prefill.graph_rows(2099, 0, 4096) is None

    def run(padded):
        be = MonokernelBackend(m, context_length=4096, prefix_cache_gb=0)
        be.prefill.warmed_long = padded
        for c in (be.k_cache, be.v_cache):
            c.fill(0x7FC0)                           # poisoned (a bf16 NaN)
        toks = list(be.start(ids, SamplingParams(), 12, set()))
        assert be.prefill._bufs["n"] == (2176 if padded else 2099)
        kv = [c[:, :2100].get() for c in be._kv_views()]
        assert not any((c == 0x7FC0).all(-1).any() for c in kv)   # every prompt row written
        return toks, kv
    got, kv_pad = run(True)
    want, kv_exact = run(False)
    assert got == want
    for a, b in zip(kv_pad, kv_exact):
        a, b = ((x.astype(np.uint32) << 16).view(np.float32) for x in (a, b))
        assert rel(a.ravel(), b.ravel()) < 1e-2


def test_graph_replay_kv_equals_the_same_launches():
    """The K/V a graph replay writes at positions 0 and 37 are bit-identical to the same padded
    chunk launched kernel by kernel (caches NaN-poisoned from the chunk on before each run, the
    37 rows before it random): the replay reads the staged ids and position, nothing baked in
    at capture."""
    import cupy as cp
    m = _greedy_model("qwen3-qknorm-h896-gqa7-hd128")
    be = MonokernelBackend(m, context_length=1024, prefix_cache_gb=0)
    pf = be.prefill
    pf.capture_at_use = 1                              # every pf._chunk below replays
    ids = np.random.default_rng(15).integers(0, m.config.vocab_size, 250).astype(np.int32)

    L, C, hd = m.config.n_layers, be.context_length, m.config.head_dim
    rng = np.random.default_rng(16)                   # cached rows before the chunk: finite
    before = (rng.standard_normal((2, L, m.config.n_kv_heads, 37, hd), np.float32).view(np.uint32)
              >> 16).astype(np.uint16)

    def kv(pos0, graph):
        with be._stream:
            for c, rows in zip((be.k_cache, be.v_cache), before):
                c.fill(0x7FC0)                        # NaN-poisoned from the chunk on
                c.reshape(L, -1, C, hd)[:, :, :pos0] = cp.asarray(rows[:, :, :pos0])
        if graph:
            pf._chunk(ids, pos0)
        else:
            pf._buffers(256)
            with be._stream:
                pf._stage(ids, pos0)
                pf._layers()
        be._stream.synchronize()
        k, v = (cp.asnumpy(c).reshape(L, -1, C, hd)[:, :, pos0:pos0 + 250] for c in (be.k_cache, be.v_cache))
        for name, c in (("k", k), ("v", v)):
            bad = np.argwhere((c == 0x7FC0).all(-1))         # (layer, head, row) left poisoned
            assert bad.size == 0, (name, pos0, graph, bad[:3].tolist(), len(bad))
        return k, v
    for pos0 in (0, 37):
        got, want = kv(pos0, True), kv(pos0, False)
        assert got[0].tobytes() == want[0].tobytes() and got[1].tobytes() == want[1].tobytes(), pos0
    assert list(pf.graphs) == [(256, pf.attention)]


def test_warm_up_captures_every_size():
    """warm_up (a server's start) compiles the sampler's filter build, grows the buffers to
    the largest chunk and captures a graph for every padded size the context holds (1024
    positions: 8), each after one kernel-by-kernel run; a prompt then replays its size's graph
    at its first use, with the greedy tokens of a backend that launches kernel by kernel -- also the prompt the live cache held before the
    warm-up overwrote it (it must not be taken for a cached prefix)."""
    from kogcupy.gpu import prefill
    m = _greedy_model()
    be = MonokernelBackend(m, context_length=1024, prefix_cache_gb=0)
    eager = MonokernelBackend(m, context_length=1024, prefix_cache_gb=0)
    eager.prefill.graphs = None
    ids = np.random.default_rng(17).integers(0, m.config.vocab_size, 200).tolist()
    want = list(eager.start(ids, SamplingParams(), 12, set()))
    assert list(be.start(ids, SamplingParams(), 12, set())) == want   # now in the live cache
    assert prefill.warm_up_sizes(1024) == [1024, 896, 768, 640, 512, 384, 256, 128]
    assert be._fn_slices is None                         # (greedy so far: the plain build)
    assert be.warm_up() == 8 and be.warm_up() == 8      # (a second call captures nothing)
    fn = be._fn_slices                                   # the filter build, compiled once
    assert fn is not None and be._function({"tp_gather_logits": 1, "all_logits": 0}) is fn
    assert sorted(rows for rows, _ in be.prefill.graphs) == list(range(128, 1025, 128))
    assert be.prefill._rows == 1024                      # min(CHUNK, the context): never regrown
    assert be.prefill.warmed_long                        # (no size past GRAPH_MAX fits here)
    uses = dict(be.prefill.uses)
    s = be.start(ids, SamplingParams(), 12, set())
    got = list(s)
    assert s.cached_tokens == 0                          # the warm-up overwrote the live cache
    assert be.prefill.uses == uses                      # replayed: no kernel-by-kernel first use
    assert got == want


def test_graph_capture_refused_runs_kernel_by_kernel(monkeypatch):
    """Where the platform refuses a capture, prefill warns once and launches kernel by kernel
    from then on, with the same tokens."""
    from kogcupy.gpu import prefill
    m = _greedy_model()
    be = MonokernelBackend(m, context_length=1024, prefix_cache_gb=0)
    ids = np.random.default_rng(14).integers(0, m.config.vocab_size, 100).tolist()
    be.prefill.capture_at_use = 1
    want = list(be.start(ids, SamplingParams(), 8, set()))
    assert list(be.prefill.graphs) == [(128, be.prefill.attention)]

    def refuse(stream, issue):
        raise RuntimeError("no capture here")
    monkeypatch.setattr(prefill, "_capture", refuse)
    be.prefill.graphs.clear()
    be.clear_prefix_cache()
    with pytest.warns(RuntimeWarning, match="no graph capture"):
        s = be.start(ids, SamplingParams(), 8, set())
        got = list(s)
    assert s.cached_tokens == 0 and be.prefill.graphs is None and got == want


def test_prefix_cache_eviction_tiny_budget():
    m = _greedy_model()
    V = m.config.vocab_size
    cfg = m.config
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2
    be = MonokernelBackend(m, context_length=1024, prefix_cache_gb=per_token * 150 / 1e9)
    rng = np.random.default_rng(11)
    p1, p2, p3 = (rng.integers(0, V, 100).tolist() for _ in range(3))
    for p in (p1, p2, p3):
        list(be.start(p, SamplingParams(), 4, set()))
    assert be.prefix_cache.stats["entries"] == 1    # room for one saved sequence only
    s = be.start(p2 + [V - 1], SamplingParams(), 4, set())
    list(s)
    assert s.cached_tokens == 100                   # p2 was saved when p3 replaced it ...
    s = be.start(p1 + [V - 1], SamplingParams(), 4, set())
    list(s)
    assert s.cached_tokens == 0                     # ... and p1 was evicted for it


def test_cancel_during_prefill():
    m = _greedy_model()
    be = MonokernelBackend(m, context_length=1024)
    ids = np.random.default_rng(12).integers(0, m.config.vocab_size, 900).tolist()
    s = be.start(ids, SamplingParams(), 50, set())
    s.cancel()
    assert list(s) == [] and s.finish_reason == "cancelled"
    s = be.start(ids[:300], SamplingParams(), 5, set())   # usable afterwards
    assert len(list(s)) == 5


@pytest.mark.parametrize("kernel,hd,heads,kv,n,pos0,dtype", [
    ("mma", 64, 4, 2, 300, 0, "bfloat16"), ("mma", 128, 6, 2, 131, 200, "bfloat16"),
    ("mma", 80, 2, 1, 129, 37, "bfloat16"), ("mma", 16, 4, 4, 257, 0, "bfloat16"),
    ("ws", 64, 4, 2, 300, 0, "bfloat16"), ("ws", 128, 6, 2, 131, 200, "bfloat16"),
    ("ws", 128, 4, 1, 517, 1000, "bfloat16"), ("ws", 64, 8, 2, 700, 61, "float16"),
    ("ws", 128, 2, 2, 1, 5000, "float16"), ("ws", 64, 2, 1, 1300, 3000, "bfloat16")])
def test_tensor_core_attention_matches_the_simple_kernel(kernel, hd, heads, kv, n, pos0, dtype):
    """kog_pf_attention (mma.sync tiles) and kog_pf_attention_ws (Hopper warpgroups) against
    kog_pf_attention_simple on random q / K / V (storage dtype): chunks that end inside a
    128-query block, after cached positions (one longer than many key tiles), one query after
    5,000, head dims that take the k16 tail (80, 16) and the 32-key tiles (128), GQA 4. Outputs
    NaN-poisoned before each run, and so are the cache rows past the chunk (never read: they
    are zero-filled in the tiles)."""
    import cupy as cp

    from kogcupy.gpu import kernels
    from kogcupy.gpu.prefill import attention_launch, prefill_defines, prefill_source
    from test_gpu_monokernel import cfg_of
    if kernel == "ws" and not kernels.has_wgmma():
        pytest.skip("warpgroup products: a compute capability 9.0 GPU (H100 / H200)")
    cfg = cfg_of("llama", 64, heads * hd, 128, 1, heads, kv, hd)
    mod = kernels.load_module(prefill_source(), prefill_defines(cfg, dtype, kernel != "mma"))
    name, bm, threads, smem = attention_launch(kernel, hd)
    fast = kernels.get_function(mod, name)
    fast.max_dynamic_shared_size_bytes = smem
    simple = kernels.get_function(mod, "kog_pf_attention_simple")
    rng = np.random.default_rng(hd + n)
    C = pos0 + n + 5

    def store(a):                       # fp32 -> the storage dtype's bits
        a = np.asarray(a, np.float32)
        if dtype == "float16":
            return cp.asarray(a.astype(np.float16).view(np.uint16))
        return cp.asarray((a.view(np.uint32) >> 16).astype(np.uint16))

    def load(u):
        u = cp.asnumpy(u)
        if dtype == "float16":
            return u.view(np.float16).astype(np.float32)
        return (u.astype(np.uint32) << 16).view(np.float32)
    q = store(rng.standard_normal((n, heads, hd)) * 2)
    kc = store(rng.standard_normal((kv, C, hd)))
    vc = store(rng.standard_normal((kv, C, hd)))
    nan = 0x7E00 if dtype == "float16" else 0x7FC0
    kc[:, pos0 + n:] = nan
    vc[:, pos0 + n:] = nan
    p0 = cp.asarray([pos0], cp.int32)
    outs = []
    for fn, grid, block, sm in ((fast, ((n + bm - 1) // bm, heads), (threads,), smem),
                                (simple, (n, heads), (32,), 0)):
        out = cp.full((n, heads * hd), nan, cp.uint16)
        fn(grid, block, (q, kc, vc, out, np.int32(n), p0, np.int32(C),
                         np.float32(np.log2(np.e) / np.sqrt(hd))), shared_mem=sm)
        outs.append(load(out))
    got, want = outs
    assert np.isfinite(got).all() and np.isfinite(want).all()
    for i in sorted({0, min(1, n - 1), n // 2, n - 1}):
        assert rel(got[i], want[i]) < 1e-2, (i, rel(got[i], want[i]))
    assert rel(got, want) < 1e-2
