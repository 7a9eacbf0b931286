"""Model weights on the GPU in the monokernel's layout, and the byte counts derived from it.

    dev = DeviceModel.from_packed(cfg, packed_weights, "bfloat16")   # packing.py's arrays
    dev = DeviceModel.random(cfg)                                     # benchmarks: made on the GPU
    part = dev.shard(rank, world, device)                             # tensor parallel share

Matrices are uint16 storage bits (bf16 or fp16), stacked per layer (shapes: matrix_shapes);
RoPE tables, biases and qk-norm gammas are fp32. ``streamed_weight_bytes`` is THE bytes-per-
token of a decode step (every speed line, the benchmark and the reference use it).
"""
from __future__ import annotations

import numpy as np

from . import kernels, tensor_parallel
from ..model.config import ModelConfig
from ..errors import DeviceError
from ..model.packed_weights import FileRange, as_packed_weights
from ..model.packing import bf16_bits, default_rope_positions, rope_tables


def _cupy():
    return kernels._cupy()


def _to_bits(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 host array -> uint16 storage bits of `dtype`."""
    if dtype == "bfloat16":
        return bf16_bits(a)
    return np.ascontiguousarray(a, dtype=np.float32).astype(np.float16).view(np.uint16)


def matrix_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Device layout of the streamed matrices (gate/up interleaved by row pair, w_down
    transposed; a tensor-parallel shard holds w_down as (L, h, f / world))."""
    L, h, f, V = cfg.n_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    return {"wqkv": (L, cfg.qkv_dim, h), "wo": (L, h, cfg.q_dim), "w_gate_up": (L, f, 2, h),
            "w_down": (L, f, h), "lm_head": (V, h), "embed": (V, h)}


def _down_transposed(dev, cfg: ModelConfig):
    """w_down from the packed layout (L, h, f) to the device's (L, f, h), a layer at a time
    (one layer's temporary): row j of a layer is column j of the down projection, the bytes
    an FFN unit's block streams (down.cuh, down_residual)."""
    cp = _cupy()
    L, h, f = cfg.n_layers, cfg.hidden_size, cfg.intermediate_size
    flat = dev.reshape(L, h * f)
    for layer in range(L):
        t = cp.ascontiguousarray(dev[layer].T)
        flat[layer] = t.reshape(-1)
        del t
    return flat.reshape(L, f, h)


def streamed_weight_bytes(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """Bytes one decode step streams from the matrices (embedding lookup not counted)."""
    n = sum(int(np.prod(s)) for k, s in matrix_shapes(cfg).items() if k != "embed")
    return n * dtype_bytes


def kv_bytes(cfg: ModelConfig, position: float, dtype_bytes: int = 2) -> float:
    """KV-cache bytes one decode step at `position` reads (K and V, every layer)."""
    return 2.0 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype_bytes * position


class DeviceModel:
    """Weights on the GPU in the kernel's layout (uint16 bits for matrices, fp32 otherwise)."""

    def __init__(self, cfg: ModelConfig, dtype: str, arrays: dict, tp: tuple[int, int] = (0, 1)):
        self.cfg, self.dtype, self.arrays = cfg, dtype, arrays
        self.tp = tp                        # (rank, world): arrays hold rank's share of cfg
        self.local_cfg = tensor_parallel.local_config(cfg, tp[1])

    def shard(self, rank: int, world: int, device: int | None = None) -> "DeviceModel":
        """Rank `rank` of `world`'s share (tensor_parallel.shard), copied to GPU `device`
        (default: the current one). This model must hold the whole model."""
        cp = _cupy()
        if self.tp != (0, 1):
            raise DeviceError("shard() needs the whole model, not a shard")
        tensor_parallel.check(self.cfg, world)
        src_dev = self.arrays["wqkv"].device.id
        dst_dev = cp.cuda.Device().id if device is None else int(device)
        out = {}
        with cp.cuda.Device(src_dev):            # slice where the whole model lives
            whole = dict(self.arrays)
            if world > 1:                          # a shard's w_down is (L, h, f / world)
                whole["w_down"] = whole["w_down"].transpose(0, 2, 1)
            parts = tensor_parallel.shard(self.cfg, whole, rank, world)
            cp.cuda.runtime.deviceSynchronize()
        for name, a in parts.items():
            assert a.device.id == src_dev
            if dst_dev == src_dev:           # replicated arrays stay shared (read-only)
                out[name] = a
                continue
            with cp.cuda.Device(dst_dev):
                d = cp.empty(a.shape, a.dtype)
            cp.cuda.runtime.memcpyPeer(d.data.ptr, dst_dev, a.data.ptr, src_dev, a.nbytes)
            out[name] = d
        for dev in {src_dev, dst_dev}:          # kernels run on non-blocking streams
            with cp.cuda.Device(dev):
                cp.cuda.runtime.deviceSynchronize()
        return DeviceModel(self.cfg, self.dtype, out, (rank, world))

    @classmethod
    def from_packed(cls, cfg: ModelConfig, weights, dtype: str) -> "DeviceModel":
        """Upload packed weights (``Model.weights``: a packed_weights.PackedWeights, or a dict
        of float32 arrays) in the kernel's layout, stored as `dtype`.

        Bytes reach the GPU as the source stores them and are converted there: a packed
        directory in `dtype` is copied straight from its file through two pinned buffers (no
        host conversion, no memory map); a HF checkpoint's tensors go up in their bf16/fp16/fp32
        bits, one at a time, and are converted and gamma-folded on the GPU; GGUF tensors are
        dequantized on the host one at a time. Host memory: the staging buffers and at most
        one source tensor, never the whole model. Every matrix is checked finite on the GPU."""
        cp = _cupy()
        W = as_packed_weights(weights)
        need = sum(int(np.prod(s)) * 2 for s in matrix_shapes(cfg).values())
        _check_memory(need, "weights")
        arrays = {}
        f = cfg.intermediate_size
        up = _Uploader()
        try:
            for name, shape in matrix_shapes(cfg).items():
                if name == "w_down":
                    shape = W.shape(name)           # packed (L, h, f); transposed below
                dev = cp.empty(shape, dtype=cp.uint16)
                fr = W.file_range(name) if W.kind(name) == dtype else None
                if fr is not None and name != "w_gate_up":
                    up.file(fr, dev)                # the stored bytes are the device layout
                else:
                    for key in W.pieces(name):
                        piece = _piece_bits(W, name, key, dtype, up)
                        if name == "w_gate_up":     # [gate; up] -> (f, 2, h) row pairs
                            piece = piece.reshape(2, f, -1).transpose(1, 0, 2)
                        dev[key] = piece
                arrays[name] = dev
            up.finish()
            arrays["w_down"] = _down_transposed(arrays["w_down"], cfg)
        finally:
            up.close()
        for name, dev in arrays.items():
            _check_finite_bits(dev, dtype, name)
        for name in ("rope_cos", "rope_sin", "bqkv", "q_norm", "k_norm"):
            if name in W:
                arrays[name] = cp.asarray(np.ascontiguousarray(W[name], dtype=np.float32))
        return cls(cfg, dtype, arrays)

    @classmethod
    def random(cls, cfg: ModelConfig, dtype: str = "bfloat16", seed: int = 0,
               rope_positions: int | None = None) -> "DeviceModel":
        """Random weights generated on the GPU (benchmarks: no multi-GB host arrays)."""
        cp = _cupy()
        need = sum(int(np.prod(s)) * 2 for s in matrix_shapes(cfg).values())
        _check_memory(need, "weights")
        rs = cp.random.RandomState(seed)
        arrays = {}
        for name, shape in matrix_shapes(cfg).items():
            fan_in = cfg.intermediate_size if name == "w_down" else shape[-1]
            scale = 1.0 if name == "embed" else 1.0 / np.sqrt(fan_in)
            dev = cp.empty(shape, dtype=cp.uint16)
            flat = dev.reshape(-1)
            step = 1 << 26
            for i in range(0, flat.size, step):
                x = rs.standard_normal(min(step, flat.size - i), dtype=cp.float32) * cp.float32(scale)
                flat[i:i + x.size] = _bits_gpu(x, dtype)
            arrays[name] = dev
        n_pos = rope_positions or default_rope_positions(cfg)
        cos, sin = rope_tables(cfg, n_pos)
        arrays["rope_cos"], arrays["rope_sin"] = cp.asarray(cos), cp.asarray(sin)
        L = cfg.n_layers
        if cfg.qkv_bias:
            arrays["bqkv"] = rs.standard_normal((L, cfg.qkv_dim), dtype=cp.float32) * cp.float32(0.1)
        if cfg.qk_norm:
            for k in ("q_norm", "k_norm"):
                g = rs.standard_normal((L, cfg.head_dim), dtype=cp.float32) * cp.float32(0.1)
                arrays[k] = g + cp.float32(1.0)
        return cls(cfg, dtype, arrays)


_CHECK_STEP = 1 << 24     # values converted / checked at a time (GPU temporaries: ~16 B each)


def _f32_gpu(d, kind: str):
    """Device values stored as `kind` (16-bit kinds as uint16 bits) -> float32."""
    cp = _cupy()
    if kind == "bfloat16":
        return (d.astype(cp.uint32) << 16).view(cp.float32)
    if kind == "float16":
        return d.view(cp.float16).astype(cp.float32)
    return d.astype(cp.float32, copy=False)


def _piece_bits(W, name: str, key, dtype: str, up: "_Uploader"):
    """One piece of a packed matrix on the GPU as uint16 bits of `dtype` (packed layout)."""
    cp = _cupy()
    shape = W.shape(name)
    rows = (key.stop - key.start) if isinstance(key, slice) else shape[1]
    cols = int(np.prod(shape[2:] if not isinstance(key, slice) else shape[1:], dtype=np.int64))
    out = cp.empty((rows, cols), dtype=cp.uint16)
    for p in W.parts(name, key):
        d = up.to_device(p.src, p.shape, p.kind).reshape(p.r1 - p.r0, cols)
        if p.kind == dtype and p.gamma is None:
            out[p.r0:p.r1] = d
            continue
        g = cp.asarray(np.asarray(p.gamma, dtype=np.float32)) if p.gamma is not None else None
        step = max(1, _CHECK_STEP // cols)          # rows converted at a time: small temporaries
        for i in range(0, p.r1 - p.r0, step):
            j = min(i + step, p.r1 - p.r0)
            x = _f32_gpu(d[i:j], p.kind)
            if g is not None:
                x = x * g
            if (p.check or p.kind != "float32") and not bool(cp.isfinite(x).all()):
                from ..errors import ModelLoadError
                raise ModelLoadError(f"{p.where or name}: holds NaN or infinite values "
                                     f"(corrupted file?)")
            out[p.r0 + i:p.r0 + j] = _bits_gpu(x, dtype)
            del x
        del d
    return out


def _check_finite_bits(dev, dtype: str, name: str) -> None:
    """ModelLoadError if a matrix's storage bits hold a NaN or an infinity (exponent all ones:
    a corrupted file, or float16 overflowing)."""
    cp = _cupy()
    mask = cp.uint16(0x7F80 if dtype == "bfloat16" else 0x7C00)
    flat, step, i = dev.reshape(-1), _CHECK_STEP, -1  # in pieces: small GPU temporaries
    for j in range(0, flat.size, step):
        bad = (flat[j:j + step] & mask) == mask
        if bool(bad.any()):
            i = j + int(bad.argmax())
            break
    if i >= 0:
        from ..errors import ModelLoadError
        where = f" (layer {i // (dev.size // dev.shape[0])})" if dev.ndim > 2 else ""
        hint = "; the values overflow float16: use --dtype bfloat16" if dtype == "float16" else ""
        raise ModelLoadError(f"packed tensor {name!r}{where} holds NaN or infinite values as "
                             f"{dtype}{hint}")


class _Uploader:
    """Host -> GPU copies on the current stream through two pinned staging buffers: a file's
    bytes are read (not mapped: host memory stays two buffers) into one buffer while the
    other one's copy runs."""

    CHUNK = 64 << 20

    def __init__(self):
        self._bufs = None

    def _setup(self):
        cp = _cupy()
        self._bufs = [cp.cuda.alloc_pinned_memory(self.CHUNK) for _ in range(2)]
        self._views = [np.ndarray((self.CHUNK,), np.uint8, buffer=b) for b in self._bufs]
        self._events = [None, None]
        self._next = 0

    def file(self, r, dev) -> None:
        """FileRange `r` -> the device array `dev` (same byte count), asynchronously."""
        import os

        from ..errors import ModelLoadError
        cp = _cupy()
        if dev.nbytes != r.nbytes:
            raise ModelLoadError(f"{r.path}: {r.nbytes} bytes do not fill a {dev.nbytes}-byte "
                                 f"device array")
        if self._bufs is None:
            self._setup()
        stream = cp.cuda.get_current_stream()
        rt = cp.cuda.runtime
        dst = dev.data.ptr
        fd = os.open(r.path, os.O_RDONLY)
        try:
            done = 0
            while done < r.nbytes:
                n = min(self.CHUNK, r.nbytes - done)
                i, self._next = self._next, self._next ^ 1
                if self._events[i] is not None:
                    self._events[i].synchronize()      # its previous copy has left the buffer
                view, got = memoryview(self._views[i])[:n], 0
                while got < n:
                    k = os.preadv(fd, [view[got:]], r.offset + done + got)
                    if k <= 0:
                        raise ModelLoadError(f"{r.path}: file ends inside a tensor (truncated?)")
                    got += k
                rt.memcpyAsync(dst + done, self._bufs[i].ptr, n, rt.memcpyHostToDevice,
                               stream.ptr)
                ev = cp.cuda.Event(disable_timing=True)
                ev.record(stream)
                self._events[i] = ev
                done += n
        finally:
            os.close(fd)

    def to_device(self, src, shape, kind: str):
        """A Part's source (host array or FileRange) on the GPU, as stored (uint16 bits for
        16-bit kinds, float32 otherwise)."""
        cp = _cupy()
        if isinstance(src, FileRange):
            d = cp.empty(shape, dtype=cp.float32 if kind == "float32" else cp.uint16)
            self.file(src, d)
            return d
        a = np.ascontiguousarray(src)
        if kind != "float32":
            a = a.view(np.uint16)
        return cp.asarray(a)

    def finish(self) -> None:
        if self._bufs is not None:
            for e in self._events:
                if e is not None:
                    e.synchronize()

    def close(self) -> None:
        self.finish()                  # a copy may not outlive its staging buffer
        self._bufs = None


def _bits_gpu(x, dtype: str):
    cp = _cupy()
    if dtype == "float16":
        return x.astype(cp.float16).view(cp.uint16)
    u = x.view(cp.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(cp.uint16)


def _check_memory(nbytes: int, what: str):
    cp = _cupy()
    free, total = cp.cuda.runtime.memGetInfo()
    pool_free = cp.get_default_memory_pool().free_bytes()
    if nbytes > free + pool_free:
        raise DeviceError(
            f"not enough GPU memory for the {what}: need {nbytes / 2**30:.2f} GiB, "
            f"{(free + pool_free) / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB; "
            f"use a smaller --context-length or model")
