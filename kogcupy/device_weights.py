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
from .config import ModelConfig
from .errors import DeviceError
from .packing import bf16_bits, default_rope_positions, rope_tables


def _cupy():
    return kernels._cupy()


def _to_bits(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 host array -> uint16 storage bits of `dtype`."""
    if dtype == "bfloat16":
        return bf16_bits(a)
    return np.ascontiguousarray(a, dtype=np.float32).astype(np.float16).view(np.uint16)


def matrix_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Device layout of the streamed matrices (gate/up interleaved by row pair)."""
    L, h, f, V = cfg.n_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    return {"wqkv": (L, cfg.qkv_dim, h), "wo": (L, h, cfg.q_dim), "w_gate_up": (L, f, 2, h),
            "w_down": (L, h, f), "lm_head": (V, h), "embed": (V, h)}


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
            parts = tensor_parallel.shard(self.cfg, self.arrays, rank, world)
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
    def from_packed(cls, cfg: ModelConfig, weights: dict[str, np.ndarray], dtype: str
                    ) -> "DeviceModel":
        cp = _cupy()
        need = sum(int(np.prod(s)) * 2 for s in matrix_shapes(cfg).values())
        _check_memory(need, "weights")
        arrays = {}
        f = cfg.intermediate_size
        for name, shape in matrix_shapes(cfg).items():
            dev = cp.empty(shape, dtype=cp.uint16)
            src = weights[name]
            if src.ndim == 3:                       # stacked per layer: convert layer by layer
                for layer in range(src.shape[0]):
                    w = src[layer]
                    if name == "w_gate_up":         # [gate; up] -> (f, 2, h) row pairs
                        w = w.reshape(2, f, -1).transpose(1, 0, 2)
                    dev[layer] = cp.asarray(_to_bits(np.ascontiguousarray(w), dtype))
            else:
                rows = max(1, (64 << 20) // (src.shape[1] * 4))
                for r0 in range(0, src.shape[0], rows):
                    dev[r0:r0 + rows] = cp.asarray(_to_bits(src[r0:r0 + rows], dtype))
            arrays[name] = dev
        for name in ("rope_cos", "rope_sin", "bqkv", "q_norm", "k_norm"):
            if name in weights:
                arrays[name] = cp.asarray(np.ascontiguousarray(weights[name], dtype=np.float32))
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
            fan_in = shape[-1]
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
