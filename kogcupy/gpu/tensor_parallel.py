"""Tensor-parallel partition of a model over N GPUs (the rank's share, decided at build time).

Rank r of N holds (Megatron-style, so each layer needs two all-reduces and nothing else):
  * query heads [r * H/N, (r + 1) * H/N) and the KV heads they read: KV/N of them when N divides
    the KV heads, else (N a multiple of KV) the one KV head its query heads share, replicated
    on the N/KV ranks that read it;
  * rows of wqkv (and bqkv) for those heads, the matching columns of wo;
  * FFN columns [r * f/N, (r + 1) * f/N): those gate/up rows and w_down columns;
  * LM-head rows of the vocabulary slice [r * V // N, (r + 1) * V // N) (any V).
Replicated: embedding, RoPE tables, qk-norm gammas. o_proj and down then give each rank a
partial of every hidden row; the monokernel all-reduces them in-kernel (kernels_src/kccl.cuh).

The kernel of a rank is compiled for ``local_config(cfg, N)``: the same model with H/N query
heads, its KV heads and f/N FFN columns; hidden size and vocabulary stay whole.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..model.config import ModelConfig
from ..errors import InputError

MAX_RANKS = 8            # KCCL_MAX_RANKS / abi.TP_MAX_RANKS


def check(cfg: ModelConfig, n: int) -> None:
    """InputError unless `cfg` splits over `n` ranks."""
    if not isinstance(n, int) or not 1 <= n <= MAX_RANKS:
        raise InputError(f"gpus={n!r}: tensor parallelism runs on 1 to {MAX_RANKS} GPUs")
    if n == 1:
        return
    if cfg.n_heads % n:
        raise InputError(f"gpus={n} does not divide the model's {cfg.n_heads} attention heads; "
                         f"use a GPU count that divides {cfg.n_heads}")
    if cfg.n_kv_heads % n and n % cfg.n_kv_heads:
        raise InputError(f"gpus={n}: the model's {cfg.n_kv_heads} KV heads can neither be split "
                         f"over nor replicated on {n} GPUs (one must divide the other)")
    if cfg.intermediate_size % (8 * n):
        raise InputError(f"gpus={n}: the FFN width {cfg.intermediate_size} is not a multiple of "
                         f"8 x {n} (16-byte rows per GPU)")
    if (cfg.q_dim // n) % 8:
        raise InputError(f"gpus={n}: {cfg.n_heads // n} heads of {cfg.head_dim} per GPU are not "
                         f"a multiple of 8 values (16-byte rows)")


def local_config(cfg: ModelConfig, n: int) -> ModelConfig:
    """One rank's share of `cfg` (same for every rank)."""
    check(cfg, n)
    if n == 1:
        return cfg
    kv = cfg.n_kv_heads // n if cfg.n_kv_heads % n == 0 else 1
    return dataclasses.replace(cfg, n_heads=cfg.n_heads // n, n_kv_heads=kv,
                               intermediate_size=cfg.intermediate_size // n)


def kv_heads(cfg: ModelConfig, rank: int, n: int) -> list[int]:
    """Global KV-head indices rank `rank` holds (in order)."""
    if n == 1:
        return list(range(cfg.n_kv_heads))
    hq = cfg.n_heads // n
    group = cfg.gqa_group
    first, last = rank * hq // group, ((rank + 1) * hq - 1) // group
    return list(range(first, last + 1))


def vocab_range(cfg: ModelConfig, rank: int, n: int) -> tuple[int, int]:
    return rank * cfg.vocab_size // n, (rank + 1) * cfg.vocab_size // n


def qkv_rows(cfg: ModelConfig, rank: int, n: int) -> np.ndarray:
    """Rows of the fused [q; k; v] matrix (and bias) that rank `rank` holds, in its order."""
    hd, hq = cfg.head_dim, cfg.n_heads // n
    q = np.arange(rank * hq * hd, (rank + 1) * hq * hd)
    kv = np.concatenate([np.arange(g * hd, (g + 1) * hd) for g in kv_heads(cfg, rank, n)])
    return np.concatenate([q, cfg.q_dim + kv, cfg.q_dim + cfg.kv_dim + kv]).astype(np.int64)


def shard(cfg: ModelConfig, arrays: dict, rank: int, n: int) -> dict:
    """Rank `rank`'s arrays from the whole model's, in the device layout of
    monokernel.matrix_shapes (wqkv (L, qkv, h), wo (L, h, q), w_gate_up (L, f, 2, h),
    w_down (L, h, f) -- DeviceModel.shard passes its (L, f, h) w_down transposed --, lm_head
    (V, h)). Works on NumPy and CuPy arrays alike; the results are contiguous (views are
    copied) and live where the inputs do."""
    xp = _array_module(arrays["wqkv"])
    if n == 1:
        return dict(arrays)
    hd, hq = cfg.head_dim, cfg.n_heads // n
    f0, f1 = rank * cfg.intermediate_size // n, (rank + 1) * cfg.intermediate_size // n
    v0, v1 = vocab_range(cfg, rank, n)
    rows = xp.asarray(qkv_rows(cfg, rank, n))
    out = {}
    for name, a in arrays.items():
        if name in ("wqkv", "bqkv"):
            b = xp.take(a, rows, axis=1)
        elif name == "wo":
            b = a[:, :, rank * hq * hd:(rank + 1) * hq * hd]
        elif name == "w_gate_up":
            b = a[:, f0:f1]
        elif name == "w_down":
            b = a[:, :, f0:f1]
        elif name == "lm_head":
            b = a[v0:v1]
        else:                                   # embed, rope tables, qk-norm gammas
            b = a
        out[name] = xp.ascontiguousarray(b)
    return out


def _array_module(a):
    if isinstance(a, np.ndarray):
        return np
    import cupy
    return cupy
