"""Batched prefill on the GPU: prompt tokens in chunks, matrix products on tensor cores.

    pf = Prefill(backend)                   # a MonokernelBackend: its weights, KV cache, stream
    pf.run(ids, start=0, end=len(ids) - 1)  # K/V of positions [start, end) into the cache
    logits = pf.logits(ids)                 # (n, V) teacher-forced, for tests

The monokernel then starts at position ``end`` (its ``start_pos``) and samples the first token
exactly as it samples every other one. Per chunk of n tokens and per layer (stage names as in
reference.py; GEMMs are cuBLAS/hipBLAS gemmEx, storage dtype in, fp32 accumulate and out):

    attn_norm_qkv          kog_pf_rmsnorm -> GEMM wqkv -> kog_pf_qkv_rope (bias, qk-norm, RoPE,
                           K/V appended to the cache)
    attention              kog_pf_attention_ws on H100 / H200 (warp-specialised warpgroup
                           products, an sm_90a build), else kog_pf_attention
                           (kernels_src/prefill_attention.cuh)
    o_proj_residual        GEMM wo, beta = 1: added into the fp32 residual x
    ffn_norm_gate_up_silu  kog_pf_rmsnorm -> GEMM w_gate_up -> kog_pf_silu_mul
    down_residual          GEMM w_down (stored transposed), beta = 1

The activations that enter a GEMM are rounded to the storage dtype (as any bf16 engine does);
the residual stream stays fp32. The buffers only grow (a warm-up grows them to the largest chunk).
"""
from __future__ import annotations

import contextlib
import functools
import gc
import warnings

import numpy as np

from . import kernels
from ..errors import DeviceError, InputError

CHUNK = 4096                      # tokens per chunk: bounds the activation buffers
# A chunk of up to GRAPH_MAX tokens replays a captured graph of the whole layer stack (every
# rank's, tensor parallel), its rows padded up to a multiple of GRAPH_STEP, one graph a padded
# size: below ~2k tokens issuing ~12 launches a layer from Python (x ranks) takes longer than
# the GPU work they launch (bench/NOTES.md, 2026-12-04). After a warm-up, longer chunks are
# padded the same way (chunk_rows), so that prompts of any length share the 16 GEMM shapes it
# ran (a new shape's first cuBLAS call costs 5-20 ms; padding costs 0-7% of a chunk). Padding
# rows are copies of the last token at the positions after the chunk; their K/V rows lie past
# the prompt, where nothing reads before the decode (or the next chunk) has written its own.
# A padded size is captured at its CAPTURE_AT_USE-th chunk: a capture costs 3-18 ms against the
# 0-8 ms a replay saves, so a one-shot prompt (`kogcupy generate`) runs kernel by kernel and a
# conversation's repeated sizes replay.
GRAPH_MAX, GRAPH_STEP = 2048, 128
CAPTURE_AT_USE = 2
BUFFER_STEP = 512                 # activation buffers grow in multiples of this many rows
_CUDA_R_16F, _CUDA_R_32F, _CUDA_R_16BF = 2, 0, 14
_CUBLAS_COMPUTE_32F = 68
_CUBLAS_GEMM_DEFAULT = -1
_OP_N, _OP_T = 0, 1


# kog_pf_attention's tiles: queries a block (4 warps of two m16 tiles); keys a K/V tile (fewer
# for head_dim 128, whose o fragments alone take 128 registers a thread)
ATTN_BM = 128


def attn_bn(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 32


def attn_smem_bytes(head_dim: int) -> int:
    """kog_pf_attention's dynamic shared memory (KOG_PF_SMEM_BYTES): Q, then two stages of
    K and V tiles, rows of head_dim + 8 elements of 2 bytes."""
    return (ATTN_BM + 2 * 2 * attn_bn(head_dim)) * (head_dim + 8) * 2


# kog_pf_attention_ws (Hopper, head_dim 64 / 128): a copying warpgroup and CWG computing ones
# of 64 queries, BN-key tiles in STAGES stages, one block an SM. (cwg, bn, stages) by head_dim:
# three computing warpgroups fit in registers at head_dim 64 only (bench/NOTES.md, 2026-12-04)
WS_TILES = {64: (3, 128, 3), 128: (2, 128, 3)}


def ws_smem_bytes(head_dim: int) -> int:
    """kog_pf_attention_ws's dynamic shared memory: alignment slack, Q, then the stages of K
    and V tiles."""
    cwg, bn, stages = WS_TILES[head_dim]
    return 1024 + (64 * cwg + 2 * stages * bn) * head_dim * 2


def attention_launch(kind: str, head_dim: int) -> tuple[str, int, int, int]:
    """(kernel name, queries a block, threads a block, dynamic shared memory) of a
    tensor-core prefill attention kernel ("ws" or "mma")."""
    return {"ws": lambda: ("kog_pf_attention_ws", 64 * WS_TILES[head_dim][0],
                           128 * (WS_TILES[head_dim][0] + 1), ws_smem_bytes(head_dim)),
            "mma": lambda: ("kog_pf_attention", ATTN_BM, 128, attn_smem_bytes(head_dim))}[kind]()


def uses_wgmma(cfg) -> bool:
    """The prefill attention runs on warpgroup products (sm_90a build) on this GPU."""
    return cfg.head_dim in WS_TILES and kernels.has_wgmma()


def prefill_defines(cfg, dtype: str, wgmma: bool = False) -> dict:
    d = {"KOG_HIDDEN": cfg.hidden_size, "KOG_FFN": cfg.intermediate_size,
         "KOG_N_HEADS": cfg.n_heads, "KOG_N_KV": cfg.n_kv_heads, "KOG_HEAD_DIM": cfg.head_dim,
         "KOG_EPS": float(cfg.rms_norm_eps), "KOG_PF_BM": ATTN_BM, "KOG_PF_BN": attn_bn(cfg.head_dim)}
    if wgmma:
        d["KOG_WGMMA"] = 1
        d["KOG_PFS_CWG"], d["KOG_PFS_BN"], d["KOG_PFS_STAGES"] = WS_TILES[cfg.head_dim]
    if dtype == "float16":
        d["KOG_WEIGHT_FP16"] = 1
    elif dtype != "bfloat16":
        raise DeviceError(f"unsupported GPU storage dtype {dtype!r}; use bfloat16 or float16")
    return d


def prefill_source() -> str:
    return kernels.inline_source("prefill.cu")


class Prefill:
    """The prefill kernels of one MonokernelBackend: the whole model on one GPU, or a
    tensor-parallel rank's share (its heads and FFN columns; TensorParallelPrefill adds the
    ranks' partials). Construct it with the backend's GPU current."""

    def __init__(self, backend):
        self.b = backend
        cfg = self.cfg = backend.lcfg            # (this GPU's share: all of it on one GPU)
        self.tp = backend.world > 1
        cp = kernels._cupy()
        wg = uses_wgmma(cfg)
        try:
            mod = kernels.load_module(prefill_source(), prefill_defines(cfg, backend.dtype, wg))
        except DeviceError as e:
            if not wg:
                raise
            # (an sm_90a build this toolchain refuses: the mma.sync kernel does the same work)
            warnings.warn(f"prefill: the warpgroup attention did not compile ({str(e)[:200]}); "
                          "using the mma.sync kernel", RuntimeWarning, stacklevel=2)
            wg = False
            mod = kernels.load_module(prefill_source(), prefill_defines(cfg, backend.dtype))
        self._fn = {name: kernels.get_function(mod, name) for name in
                    ("kog_pf_embed", "kog_pf_rmsnorm", "kog_pf_qkv_rope", "kog_pf_silu_mul",
                     "kog_pf_attention_simple", "kog_pf_add_parts")}
        # the attention kernels this GPU has, fastest first (`attention` is the one used):
        # warpgroup products (Hopper, sm_90a build), mma.sync tiles where
        # prefill_attention.cuh compiled them (KOG_PF_MMA), the portable one
        self.attention_kernels = ["simple"]
        if not kernels.is_hip() and int(cp.cuda.Device().compute_capability) >= 80:
            try:
                fn = kernels.get_function(mod, "kog_pf_attention")
            except DeviceError:
                fn = None
            if fn is not None:
                smem = attention_launch("mma", cfg.head_dim)[3]
                if smem > 48 * 1024:
                    fn.max_dynamic_shared_size_bytes = smem
                self._fn["kog_pf_attention"] = fn
                self.attention_kernels.insert(0, "mma")
        if wg:
            name, _, _, smem = attention_launch("ws", cfg.head_dim)
            fn = kernels.get_function(mod, name)
            fn.max_dynamic_shared_size_bytes = smem
            self._fn[name] = fn
            self.attention_kernels.insert(0, "ws")
        self.attention = self.attention_kernels[0]
        self._dtype_code = _CUDA_R_16F if backend.dtype == "float16" else _CUDA_R_16BF
        self._one = np.ones(1, np.float32)
        self._zero = np.zeros(1, np.float32)
        self._bufs: dict = {}
        self._rows = 0                                  # rows the buffers hold
        self._blas = _Blas(backend._stream)
        self._pos0 = cp.zeros(1, cp.int32)              # the chunk's first position
        self.limit = min(backend.context_length, int(backend.dev.arrays["rope_cos"].shape[0]))
        # (padded rows, attention kernel) -> graph; None: kernel by kernel (HIP: hipBLAS in a
        # capture is untested; or no cuBLAS to call outside CuPy's wrappers)
        self.graphs: dict | None = {} if self._blas.capturable else None
        self.uses: dict = {}                            # key -> chunks run with that key
        self.capture_at_use = CAPTURE_AT_USE
        self.warmed_long = False                        # chunks past GRAPH_MAX padded (_warm_up)
        self._warp = int(cp.cuda.Device().attributes["WarpSize"])

    # ---- buffers -------------------------------------------------------------------------
    def _buffers(self, n: int) -> dict:
        """Buffers for chunks of n tokens ("n"); they only grow (in BUFFER_STEP rows), and the
        graphs captured on smaller ones go with them."""
        if n <= self._rows:
            self._bufs["n"] = n
            return self._bufs
        cp = kernels._cupy()
        cfg = self.cfg
        self._bufs, self._rows = {}, 0         # free the old buffers first (none, if this fails)
        if self.graphs:
            self.graphs.clear()
        n_alloc = -(-n // BUFFER_STEP) * BUFFER_STEP
        u16, f32 = cp.uint16, cp.float32
        with _prefill_memory(n_alloc):
            bufs = dict(
                n=n,
                ids=cp.empty(n_alloc, cp.int32),
                x=cp.empty((n_alloc, cfg.hidden_size), f32),               # residual stream (fp32)
                xn=cp.empty((n_alloc, max(cfg.hidden_size, cfg.intermediate_size)), u16),  # GEMM in
                qkv=cp.empty((n_alloc, cfg.qkv_dim), f32),
                q=cp.empty((n_alloc, cfg.n_heads, cfg.head_dim), u16),
                attn=cp.empty((n_alloc, cfg.q_dim), u16),
                gu=cp.empty((n_alloc, 2 * cfg.intermediate_size), f32),
            )
        self._bufs, self._rows = bufs, n_alloc
        return self._bufs

    # ---- GEMM: y (n, out) [+]= a (n, k) @ w (out, k)^T, or @ w (k, out) when w_kn ----------
    def _gemm(self, a_ptr: int, w_ptr: int, y_ptr: int, n: int, k: int, out: int,
              accumulate: bool, w_kn: bool = False):
        beta = self._one if accumulate else self._zero
        # column-major view: y^T (out x n) = w (k x out)^T . a^T (k x n); w_kn: w is already
        # (out x k) column-major
        self._blas.gemm_ex(_OP_N if w_kn else _OP_T, _OP_N, out, n, k,
                           self._one.ctypes.data, w_ptr, self._dtype_code, out if w_kn else k,
                           a_ptr, self._dtype_code, k,
                           beta.ctypes.data, y_ptr, _CUDA_R_32F, out,
                           _CUBLAS_COMPUTE_32F, _CUBLAS_GEMM_DEFAULT)

    # ---- one chunk, stage by stage (the buffers of _buffers(n); on the backend's stream) ----
    def _stage(self, ids: np.ndarray, pos0: int):
        """The chunk's token ids (padded with its last one to buf["n"] rows) and its first
        position to the GPU, on the backend's stream (never captured: the graphs read them)."""
        buf, b = self._bufs, self.b
        ids = np.asarray(ids, np.int32)
        n = buf["n"]
        if ids.shape[0] < n:
            ids = np.concatenate([ids, np.full(n - ids.shape[0], ids[-1], np.int32)])
        buf["ids"][:n].set(ids, stream=b._stream)
        self._pos0.set(np.array([pos0], np.int32), stream=b._stream)

    def _embed(self):
        buf, b = self._bufs, self.b
        self._fn["kog_pf_embed"]((buf["n"],), (256,), (b.dev.arrays["embed"], buf["ids"], buf["x"]))

    def _attention(self, layer: int):
        """attn_norm_qkv and attention: K/V of the chunk into the cache, its attention output
        (n, q_dim) in buf["attn"]."""
        cfg, b, buf, fn = self.cfg, self.b, self._bufs, self._fn
        a, n, hd, C = b.dev.arrays, buf["n"], cfg.head_dim, b.context_length
        x, xn, qkv, q, attn = (buf[k] for k in ("x", "xn", "qkv", "q", "attn"))
        fn["kog_pf_rmsnorm"]((n,), (256,), (x, xn))
        self._gemm(xn.data.ptr, a["wqkv"][layer].data.ptr, qkv.data.ptr, n, cfg.hidden_size,
                   cfg.qkv_dim, False)
        layer_kv = cfg.n_kv_heads * C * hd * 2                      # bytes per layer of K or V
        kc = b.k_cache.data.ptr + layer * layer_kv
        vc = b.v_cache.data.ptr + layer * layer_kv
        bias = a["bqkv"][layer].data.ptr if "bqkv" in a else 0
        qn = a["q_norm"][layer].data.ptr if "q_norm" in a else 0
        kn = a["k_norm"][layer].data.ptr if "k_norm" in a else 0
        fn["kog_pf_qkv_rope"]((n,), (256,), (
            qkv, np.uint64(bias), np.uint64(qn), np.uint64(kn), a["rope_cos"],
            a["rope_sin"], q, np.uint64(kc), np.uint64(vc), self._pos0, np.int32(C)))
        args = (q, np.uint64(kc), np.uint64(vc), attn, np.int32(n), self._pos0,
                np.int32(C), np.float32(np.log2(np.e) / np.sqrt(hd)))
        if self.attention == "simple":
            fn["kog_pf_attention_simple"]((n, cfg.n_heads), (self._warp,), args)
        else:
            name, bm, threads, smem = attention_launch(self.attention, hd)
            fn[name](((n + bm - 1) // bm, cfg.n_heads), (threads,), args, shared_mem=smem)

    def _o_proj(self, layer: int, out_ptr: int, accumulate: bool):
        """o_proj (n, h): added into x (one GPU), or this rank's partial."""
        buf = self._bufs
        self._gemm(buf["attn"].data.ptr, self.b.dev.arrays["wo"][layer].data.ptr, out_ptr,
                   buf["n"], self.cfg.q_dim, self.cfg.hidden_size, accumulate)

    def _gate_up(self, layer: int):
        """ffn_norm_gate_up_silu: the activations (n, f) in buf["xn"]."""
        cfg, buf, fn = self.cfg, self._bufs, self._fn
        n, f = buf["n"], cfg.intermediate_size
        fn["kog_pf_rmsnorm"]((n,), (256,), (buf["x"], buf["xn"]))
        self._gemm(buf["xn"].data.ptr, self.b.dev.arrays["w_gate_up"][layer].data.ptr,
                   buf["gu"].data.ptr, n, cfg.hidden_size, 2 * f, False)
        total = n * f
        fn["kog_pf_silu_mul"]((_grid(total),), (256,), (buf["gu"], buf["xn"], np.uint64(total)))

    def _down(self, layer: int, out_ptr: int, accumulate: bool):
        """down (n, h): added into x (one GPU: w_down stored (L, f, h)), or this rank's
        partial (a shard's w_down is (L, h, f / world))."""
        buf = self._bufs
        self._gemm(buf["xn"].data.ptr, self.b.dev.arrays["w_down"][layer].data.ptr, out_ptr,
                   buf["n"], self.cfg.intermediate_size, self.cfg.hidden_size, accumulate,
                   w_kn=not self.tp)

    def _add_parts(self, parts, n_parts: int):
        """Tensor parallel: x += parts[0] + parts[1] + ... (rank order; parts (R, rows, h),
        the first n rows of each)."""
        total = self._bufs["n"] * self.cfg.hidden_size
        self._fn["kog_pf_add_parts"]((_grid(total),), (256,), (
            self._bufs["x"], parts, np.int32(n_parts), np.uint64(total),
            np.uint64(parts.shape[1] * self.cfg.hidden_size)))

    def _layers(self, n_layers: int | None = None):
        """The staged chunk through every layer (the first n_layers), on the current stream.
        One GPU."""
        x = self._bufs["x"].data.ptr
        self._embed()
        for layer in range(self.cfg.n_layers if n_layers is None else n_layers):
            self._attention(layer)
            self._o_proj(layer, x, True)
            self._gate_up(layer)
            self._down(layer, x, True)

    def _chunk(self, ids: np.ndarray, pos0: int, want_x: bool = False,
               n_layers: int | None = None):
        """Run tokens `ids` at positions pos0.. through every layer (n_layers: the first ones,
        kernel by kernel: the warm-up); K/V land in the cache. Returns the fp32 residual x (n, h)
        when want_x (for logits; eager). One GPU."""
        b, n = self.b, int(ids.shape[0])
        rows, size = _chunk_sizes(self, n, pos0, eager=want_x or n_layers is not None)
        buf = self._buffers(size)
        with b._stream:
            self._stage(ids, pos0)
            if rows is None:
                self._layers(n_layers)
            else:
                graph = _graph_for(self, (rows, self.attention), b._stream, self._layers)
                if graph is None:
                    self._layers()
                else:
                    graph.launch(b._stream)
        return buf["x"][:n] if want_x else None

    # ---- entry points --------------------------------------------------------------------
    def _check_positions(self, end: int):
        """Positions [0, end) must fit the KV cache (and the RoPE table it was sized by)."""
        if end > self.b.context_length:
            raise InputError(f"{end} positions exceed the context length {self.b.context_length}")

    def run(self, ids, start: int, end: int, should_stop=None, chunk: int = CHUNK) -> int:
        """K/V of positions [start, end) of `ids` into the cache, chunk by chunk. Between
        chunks ``should_stop()`` is asked (cancel); returns the end of what was written."""
        self._check_positions(end)
        return _run_chunks(ids, start, end, should_stop, chunk, self._chunk,
                           self.b._stream.synchronize)

    def warm_up(self) -> int:
        """Graphs for every padded size (warm_up_sizes), and one run of each longer padded
        size (eager_sizes) through the first layer; returns how many graphs this prefill
        holds. A server calls it at start: then the first chunk of any size up to GRAPH_MAX
        replays, and no chunk pays cuBLAS's first-call setup for its shapes. Writes K/V at
        positions [0, min(CHUNK, limit)): the backend forgets what its live cache held."""
        return _warm_up(self, self._chunk, self.attention)

    def logits(self, ids, chunk: int = CHUNK) -> np.ndarray:
        """(n, V) float32 logits of every position of `ids` (from position 0), teacher-forced
        through the prefill path: the test hook that compares it with the reference."""
        if self.tp:
            raise DeviceError("Prefill.logits runs on one GPU (a rank holds a slice of the LM head)")
        cp = kernels._cupy()
        ids = np.asarray(ids, dtype=np.int32)
        self._check_positions(len(ids))
        cfg, b = self.cfg, self.b
        out = np.empty((len(ids), cfg.vocab_size), np.float32)
        for pos in range(0, len(ids), chunk):
            part = ids[pos:pos + chunk]
            x = self._chunk(part, pos, want_x=True)
            n = len(part)
            with b._stream:
                xn = cp.empty((n, cfg.hidden_size), cp.uint16)
                self._fn["kog_pf_rmsnorm"]((n,), (256,), (x, xn))
                lg = cp.empty((n, cfg.vocab_size), cp.float32)
                lg.fill(np.nan)
                self._gemm(xn.data.ptr, b.dev.arrays["lm_head"].data.ptr, lg.data.ptr, n,
                           cfg.hidden_size, cfg.vocab_size, False)
                out[pos:pos + n] = cp.asnumpy(lg, stream=b._stream)
            b._stream.synchronize()
        return out


class _Blas:
    """gemmEx on one stream from a handle of its own (ranks sharing a GPU run GEMMs on their
    streams at once, and a handle's workspace must not serve two streams), alpha / beta host
    scalars. On CUDA the calls go straight to cuBLAS (ctypes; the handle made by the same
    library) with a workspace of its own: CuPy's wrappers re-set the handle's stream on every
    call, which they refuse while the stream captures a graph (and which drops the workspace).
    Elsewhere (HIP, or no cuBLAS found to call): CuPy's wrappers, and `capturable` is False."""
    WORKSPACE = 32 << 20

    def __init__(self, stream):
        cp = kernels._cupy()
        self._device = cp.cuda.Device().id
        self._lib = _cublas_library() if not kernels.is_hip() else None
        self.capturable = self._lib is not None
        if self._lib is None:
            from cupy_backends.cuda.libs import cublas
            self._cupy_blas = cublas                # (hipBLAS through CuPy's wrappers)
            self.handle = cublas.create()
            cublas.setPointerMode(self.handle, 0)
            return
        import ctypes
        lib = self._lib
        h = ctypes.c_void_p()
        if lib.cublasCreate_v2(ctypes.byref(h)):
            raise DeviceError("prefill: cublasCreate failed")
        self.handle = h.value
        self._ws = cp.empty(self.WORKSPACE, cp.uint8)
        for what, status in (
                ("cublasSetStream", lib.cublasSetStream_v2(h, ctypes.c_void_p(stream.ptr))),
                ("cublasSetWorkspace", lib.cublasSetWorkspace_v2(
                    h, ctypes.c_void_p(self._ws.data.ptr), ctypes.c_size_t(self.WORKSPACE))),
                ("cublasSetPointerMode", lib.cublasSetPointerMode_v2(h, 0))):
            if status:
                raise DeviceError(f"prefill: {what} failed (cuBLAS status {status})")
        fn = lib.cublasGemmEx
        P, I = ctypes.c_void_p, ctypes.c_int
        fn.argtypes = [P, I, I, I, I, I, P, P, I, I, P, I, I, P, P, I, I, I, I]
        fn.restype = I

    def gemm_ex(self, *args):
        """cublasGemmEx(handle, *args) on the handle's stream (CuPy's wrappers: the current
        stream, which every caller makes the backend's)."""
        if self._lib is None:
            self._cupy_blas.gemmEx(self.handle, *args)
            return
        status = self._lib.cublasGemmEx(self.handle, *args)
        if status:
            raise DeviceError(f"prefill: cublasGemmEx failed (cuBLAS status {status})")

    def __del__(self):
        # (never touch the stream here: a garbage-collected backend's stream may already be
        # gone; the handle is pointed at the null stream first, then destroyed)
        try:
            cp = kernels._cupy()
            with cp.cuda.Device(self._device):
                if self._lib is None:
                    self._cupy_blas.setStream(self.handle, 0)
                    self._cupy_blas.destroy(self.handle)
                else:
                    import ctypes
                    h = ctypes.c_void_p(self.handle)
                    self._lib.cublasSetStream_v2(h, None)
                    self._lib.cublasDestroy_v2(h)
        except Exception:           # (at interpreter exit the context may be gone)
            pass


@functools.cache
def _cublas_library():
    """ctypes handle of the cuBLAS library CuPy loaded (found among the process's mapped files:
    the same copy, whatever wheel or toolkit it came from; else by name), or None."""
    import ctypes
    import ctypes.util
    import os
    from cupy_backends.cuda.libs import cublas  # noqa: F401 -- maps CuPy's libcublas
    paths = []
    try:
        with open("/proc/self/maps") as f:
            for ln in f:
                parts = ln.split(maxsplit=5)
                if len(parts) == 6 and os.path.basename(parts[5].strip()).startswith("libcublas.so"):
                    paths.append(parts[5].strip())
    except OSError:
        pass
    for name in list(dict.fromkeys(paths)) + [ctypes.util.find_library("cublas")]:
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    return None


def chunk_rows(n: int, pos0: int, limit: int) -> int:
    """Rows a chunk of n tokens at positions pos0.. runs as after a warm-up: n rounded up to
    GRAPH_STEP, so that prompts of any length share the shapes the warm-up ran (cuBLAS sets up
    each new GEMM shape at its first call, 5-20 ms), or n where the padding would pass `limit`,
    the positions the KV cache and the RoPE tables hold (a shape the warm-up did not run)."""
    rows = -(-n // GRAPH_STEP) * GRAPH_STEP
    return rows if pos0 + rows <= limit else n


def graph_rows(n: int, pos0: int, limit: int) -> int | None:
    """Rows of the graph that a chunk of n tokens at positions pos0.. replays (n rounded up to
    GRAPH_STEP), or None: run it eagerly (longer than GRAPH_MAX, or the padding would pass
    `limit`)."""
    if n > GRAPH_MAX:
        return None
    rows = -(-n // GRAPH_STEP) * GRAPH_STEP
    return rows if pos0 + rows <= limit else None


def _chunk_sizes(owner, n: int, pos0: int, eager: bool = False) -> tuple[int | None, int]:
    """(graph rows or None, rows the buffers run) for a chunk of n tokens at positions pos0..
    of `owner` (a Prefill or TensorParallelPrefill): a graph size where one applies; past
    GRAPH_MAX the padded size once a warm-up ran it (owner.warmed_long), else n. `eager`: at
    its exact size, kernel by kernel (logits)."""
    if eager:
        return None, n
    rows = None if owner.graphs is None else graph_rows(n, pos0, owner.limit)
    return rows, rows or (chunk_rows(n, pos0, owner.limit) if owner.warmed_long else n)


def _capture(stream, issue):
    """A graph of what issue() launches on `stream` (and on the streams it joins to it). No
    cyclic garbage collection meanwhile: it could run a dead backend's finalizers (a stream or
    cuBLAS handle destroyed), calls that invalidate a capture. (Objects freed by their last
    reference, or by another thread, still could: the backends hold theirs until they go.)"""
    collecting = gc.isenabled()
    gc.disable()
    try:
        stream.begin_capture()
        try:
            issue()
        except BaseException:
            try:
                stream.end_capture()
            except Exception:         # (the capture is already invalid: report issue's error)
                pass
            raise
        return stream.end_capture()
    finally:
        if collecting:
            gc.enable()


@contextlib.contextmanager
def _prefill_memory(rows: int):
    """A GPU out-of-memory error while allocating prefill buffers for `rows` tokens as a
    DeviceError that says what to change."""
    cp = kernels._cupy()
    try:
        yield
    except cp.cuda.memory.OutOfMemoryError as e:
        raise DeviceError(f"not enough GPU memory for the prompt buffers of a {rows}-token "
                          f"prefill chunk ({e}); a smaller --context-length (kogcupy serve: "
                          f"or --prefix-cache-gb) leaves more") from None


def warm_up_sizes(limit: int) -> list[int]:
    """The padded sizes a warm-up captures, largest first: every multiple of GRAPH_STEP up to
    GRAPH_MAX that fits `limit` positions."""
    return list(range(min(GRAPH_MAX, limit) // GRAPH_STEP * GRAPH_STEP, 0, -GRAPH_STEP))


def eager_sizes(limit: int, chunk: int = CHUNK) -> list[int]:
    """The padded sizes past GRAPH_MAX (run kernel by kernel) a warm-up runs once, so that
    cuBLAS has set up their shapes before a request: multiples of GRAPH_STEP up to a chunk."""
    return list(range(GRAPH_MAX + GRAPH_STEP, min(chunk, limit) + 1, GRAPH_STEP))


def _warm_up(owner, run_chunk, attention) -> int:
    """Each padded size's chunk run as a request would run it until its graph is captured
    (a first run kernel by kernel, then the capture: a capture of a shape cuBLAS has not run
    yet can fail), and each longer padded size once through the first layer (every layer's GEMMs
    have the same shapes, which is what cuBLAS sets up), after which longer chunks are padded
    (owner.warmed_long). The buffers first grow to the largest chunk a request can run (CHUNK
    tokens), so that no later prompt grows them and drops the graphs. Token ids: a fixed
    pseudo-random sequence. Returns the graphs held (0: none, e.g. the platform refused a
    capture)."""
    if owner.graphs is None:
        return 0
    owner._buffers(min(CHUNK, owner.limit))
    sizes = warm_up_sizes(owner.limit)
    longer = eager_sizes(owner.limit)
    ids = ((np.arange(max(sizes[:1] + longer[-1:], default=0), dtype=np.int64) * 7919 + 13)
           % owner.cfg.vocab_size).astype(np.int32)
    for rows in sizes:
        for _ in range(owner.capture_at_use):
            if owner.graphs is None or (rows, attention) in owner.graphs:
                break
            run_chunk(ids[:rows], 0)
    if owner.graphs is not None:
        owner.warmed_long = True
        for rows in longer:               # (every layer has the same GEMM shapes: one is enough)
            run_chunk(ids[:rows], 0, n_layers=1)
    return len(owner.graphs or ())


def _graph_for(owner, key, stream, issue):
    """The graph that replays chunk `key`: owner.graphs[key], captured at the key's
    owner.capture_at_use-th use (counted in owner.uses); None: run this chunk kernel by kernel."""
    graph = owner.graphs.get(key)
    if graph is None:
        owner.uses[key] = uses = owner.uses.get(key, 0) + 1
        if uses >= owner.capture_at_use:
            graph = _capture_or_warn(owner, key, stream, issue)
    return graph


def _capture_or_warn(owner, key, stream, issue):
    """owner.graphs[key] = the graph of issue(), returned; None (and owner.graphs = None: kernel
    by kernel from now on, with a warning) where the capture failed -- a platform that refuses
    it, or an error inside it, which the kernel-by-kernel run then reports itself."""
    try:
        graph = _capture(stream, issue)
    except Exception as e:                  # noqa: BLE001 -- (cupy / the driver / cuBLAS)
        warnings.warn(f"prefill: no graph capture on this GPU ({type(e).__name__}: "
                      f"{str(e)[:160]}); launching kernel by kernel", RuntimeWarning,
                      stacklevel=3)
        owner.graphs = None
        return None
    owner.graphs[key] = graph
    return graph


def _grid(total: int) -> int:
    """Blocks of 256 threads for a grid-stride loop over `total` elements (at most 65,535)."""
    return min(65535, (total + 255) // 256)


def _run_chunks(ids, start: int, end: int, should_stop, chunk: int, run_chunk, sync) -> int:
    """Prefill.run's loop: run_chunk(ids[pos:pos + n], pos) for chunks of [start, end);
    between chunks sync() (a cancel takes effect there) and should_stop()."""
    ids = np.asarray(ids, dtype=np.int32)
    pos = start
    while pos < end:
        if should_stop is not None and should_stop():
            break
        n = min(chunk, end - pos)
        run_chunk(ids[pos:pos + n], pos)
        pos += n
        if pos < end:
            sync()
    return pos


class TensorParallelPrefill:
    """Batched prefill over the ranks of a TensorParallelBackend. Each rank runs its heads and
    FFN columns (a Prefill on its shard); after o_proj and after down every rank copies the
    other ranks' partials next to its own (peer copies, one per pair) and adds them all in rank
    order, so the ranks' residual streams stay bit-identical. The ranks' streams order it:
    a partial is copied after the event its GEMM recorded, and a rank overwrites its partial
    only after every peer recorded that its copy and add are done. A chunk of up to GRAPH_MAX
    tokens replays one graph of every rank's work (captured from rank 0's stream, the other
    ranks' streams joined to it), launched after every rank's earlier work; every rank's later
    work waits for all of it."""

    def __init__(self, backend):
        cp = kernels._cupy()
        self.ranks = backend.ranks
        self.pfs = []
        for r in self.ranks:
            with cp.cuda.Device(r.device_id):
                self.pfs.append(Prefill(r))
        self.cfg = self.pfs[0].cfg
        self.limit = min(pf.limit for pf in self.pfs)
        # (padded rows, attention kernel) -> graph of every rank's work; None: kernel by kernel
        self.graphs: dict | None = {} if all(pf.graphs is not None for pf in self.pfs) else None
        self.uses: dict = {}
        self.capture_at_use = CAPTURE_AT_USE
        self.warmed_long = False           # chunks past GRAPH_MAX padded (_warm_up)
        self._n = 0                        # tokens of the current chunk
        self._rows = 0                     # rows the gather buffers hold
        self._gather: list = []            # per rank (R, rows, h) fp32: slot q, rank q's partial
        self._done: list = []              # per rank: its copies and add of the last exchange

    def _each(self):
        """(rank, prefill) with the rank's GPU current and its stream the current stream."""
        cp = kernels._cupy()
        for r, pf in zip(self.ranks, self.pfs):
            with cp.cuda.Device(r.device_id), r._stream:
                yield r, pf

    def _sync(self):
        for r in self.ranks:
            r._stream.synchronize()

    def _buffers(self, n: int):
        cp = kernels._cupy()
        self._n = n
        if n <= self._rows:
            for pf in self.pfs:
                pf._buffers(n)
            return
        self._sync()                              # nothing in flight uses the old buffers
        self._gather, self._done, self._rows = [], [], 0
        if self.graphs:
            self.graphs.clear()
        for r, pf in self._each():
            pf._buffers(n)
            with _prefill_memory(pf._rows):
                g = cp.empty((len(self.ranks), pf._rows, self.cfg.hidden_size), cp.float32)
            g.fill(np.nan)                        # poisoned: a partial never copied shows
            self._gather.append(g)
        self._rows = self.pfs[0]._rows

    def _exchange(self, partial):
        """partial(pf, out_ptr): each rank's partial into its own gather slot; then every rank
        adds all of them into its x."""
        cp = kernels._cupy()
        R = len(self.ranks)
        nbytes = self._n * self.cfg.hidden_size * 4
        ready = []
        for q, (r, pf) in enumerate(self._each()):
            for p, ev in enumerate(self._done):       # the peers are done with this slot
                if p != q:
                    r._stream.wait_event(ev)
            partial(pf, self._gather[q][q].data.ptr)
            ready.append(cp.cuda.Event(disable_timing=True))
            ready[-1].record(r._stream)
        done = []
        for p, (r, pf) in enumerate(self._each()):
            for q in range(R):
                if q != p:
                    r._stream.wait_event(ready[q])
                    # (a peer copy by unified addresses: cudaMemcpyPeerAsync cannot be captured)
                    cp.cuda.runtime.memcpyAsync(
                        self._gather[p][q].data.ptr, self._gather[q][q].data.ptr, nbytes,
                        cp.cuda.runtime.memcpyDefault, r._stream.ptr)
            pf._add_parts(self._gather[p], R)
            done.append(cp.cuda.Event(disable_timing=True))
            done[-1].record(r._stream)
        self._done = done

    def _layers(self, n_layers: int | None = None):
        """The staged chunk through every layer (the first n_layers) on every rank (each on
        its stream)."""
        for _, pf in self._each():
            pf._embed()
        for layer in range(self.cfg.n_layers if n_layers is None else n_layers):
            for _, pf in self._each():
                pf._attention(layer)
            self._exchange(lambda pf, out: pf._o_proj(layer, out, False))
            for _, pf in self._each():
                pf._gate_up(layer)
            self._exchange(lambda pf, out: pf._down(layer, out, False))

    @staticmethod
    def _join(into, ranks):
        """Rank `into`'s stream waits for what is queued on the streams of `ranks` so far."""
        cp = kernels._cupy()
        for r in ranks:
            with cp.cuda.Device(r.device_id):         # (an event records on its own GPU)
                ev = cp.cuda.Event(disable_timing=True)
                ev.record(r._stream)
            into._stream.wait_event(ev)

    def _captured_layers(self):
        """_layers() as rank 0's stream captures it: the other ranks' streams fork from it and
        join back (no wait on an event recorded outside the capture)."""
        r0, others = self.ranks[0], self.ranks[1:]
        self._done = []
        for r in others:
            self._join(r, [r0])
        self._layers()
        self._join(r0, others)

    def _chunk(self, ids: np.ndarray, pos0: int, n_layers: int | None = None):
        n = int(ids.shape[0])
        rows, size = _chunk_sizes(self, n, pos0, eager=n_layers is not None)
        self._buffers(size)
        for _, pf in self._each():
            pf._stage(ids, pos0)
        if rows is None:
            self._layers(n_layers)
            return
        cp = kernels._cupy()
        r0, others = self.ranks[0], self.ranks[1:]
        with cp.cuda.Device(r0.device_id):
            try:
                self._join(r0, others)                # after every rank's earlier work
                graph = _graph_for(self, (rows, self.pfs[0].attention), r0._stream,
                                   self._captured_layers)
                if graph is not None:
                    graph.launch(r0._stream)
                for r in others:                      # every rank's later work after all of it
                    self._join(r, [r0])
            finally:
                # a graph chunk leaves no exchange events to wait on (those a capture recorded
                # never ran; the joins above order everything else)
                self._done = []
        if graph is None:                             # (no capture on this platform)
            self._layers()

    def warm_up(self) -> int:
        """Prefill.warm_up for every rank's work at once (one multi-GPU graph a size)."""
        n = _warm_up(self, self._chunk, self.pfs[0].attention)
        self._sync()
        return n

    def run(self, ids, start: int, end: int, should_stop=None, chunk: int = CHUNK) -> int:
        """K/V of positions [start, end) of `ids` into every rank's cache (Prefill.run)."""
        self.pfs[0]._check_positions(end)
        done = _run_chunks(ids, start, end, should_stop, chunk, self._chunk, self._sync)
        self._sync()
        return done
