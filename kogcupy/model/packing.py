"""The packed weight layout every backend runs on, and the transforms that produce it.

Checkpoints are read tensor by tensor through a getter using the *canonical* names below
(HF layout: half-split RoPE row order, separate q/k/v, norm gammas separate). ``pack_weights``
turns them into the *packed* layout, filling preallocated stacked arrays one tensor at a time
so loading holds at most one extra tensor beyond the result:

    embed      (vocab, hidden)          token embedding rows (looked up, not streamed)
    wqkv       (L, qkv_dim, hidden)     [q; k; v] rows, attn_norm gamma folded into columns
    bqkv       (L, qkv_dim)             qwen2 only: q/k/v biases
    q_norm     (L, head_dim)            qwen3 only: RMSNorm gamma applied per q head
    k_norm     (L, head_dim)            qwen3 only: RMSNorm gamma applied per k head
    wo         (L, hidden, q_dim)
    w_gate_up  (L, 2 * ffn, hidden)     [gate; up] rows, ffn_norm gamma folded into columns
    w_down     (L, hidden, ffn)
    lm_head    (vocab, hidden)          final_norm gamma folded into columns
    rope_cos   (rope_positions, head_dim // 2)   cos(pos * inv_freq), half-split RoPE
    rope_sin   (rope_positions, head_dim // 2)

Folding works because RMSNorm is ``x / rms(x) * gamma`` and the next op is a matmul:
``W @ (n * gamma) == (W * gamma) @ n``. The packed arrays are float32 in memory; a packed
directory stores them as fp16/bf16 (``weights_tools``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .config import ModelConfig

PACK_FORMAT = "kogcupy-packed"
PACK_FORMAT_VERSION = 1
ROPE_TABLE_MAX_POSITIONS = 16384
ROPE_TABLES = ("rope_cos", "rope_sin")     # computed from the config, never streamed

CANONICAL_LAYER_TENSORS = ("attn_norm", "wq", "wk", "wv", "bq", "bk", "bv", "q_norm", "k_norm",
                           "wo", "ffn_norm", "w_gate", "w_up", "w_down")
CANONICAL_GLOBAL_TENSORS = ("embed", "final_norm", "lm_head")

# getter(name, layer) -> float32 array of the canonical tensor; layer is None for globals.
# For tied embeddings the getter is never asked for "lm_head".
Getter = Callable[[str, "int | None"], np.ndarray]


def canonical_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    h, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    return {
        "embed": (cfg.vocab_size, h), "lm_head": (cfg.vocab_size, h), "final_norm": (h,),
        "attn_norm": (h,), "ffn_norm": (h,),
        "wq": (cfg.q_dim, h), "wk": (cfg.kv_dim, h), "wv": (cfg.kv_dim, h),
        "bq": (cfg.q_dim,), "bk": (cfg.kv_dim,), "bv": (cfg.kv_dim,),
        "q_norm": (hd,), "k_norm": (hd,),
        "wo": (h, cfg.q_dim), "w_gate": (f, h), "w_up": (f, h), "w_down": (h, f),
    }[name]


def layer_tensor_names(cfg: ModelConfig) -> list[str]:
    """Canonical per-layer tensors this config's checkpoint must contain."""
    names = ["attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down"]
    if cfg.qkv_bias:
        names += ["bq", "bk", "bv"]
    if cfg.qk_norm:
        names += ["q_norm", "k_norm"]
    return names


def packed_shapes(cfg: ModelConfig, rope_positions: int) -> dict[str, tuple[int, ...]]:
    L, h, f = cfg.n_layers, cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "embed": (cfg.vocab_size, h),
        "wqkv": (L, cfg.qkv_dim, h),
        "wo": (L, h, cfg.q_dim),
        "w_gate_up": (L, 2 * f, h),
        "w_down": (L, h, f),
        "lm_head": (cfg.vocab_size, h),
        "rope_cos": (rope_positions, cfg.head_dim // 2),
        "rope_sin": (rope_positions, cfg.head_dim // 2),
    }
    if cfg.qkv_bias:
        shapes["bqkv"] = (L, cfg.qkv_dim)
    if cfg.qk_norm:
        shapes["q_norm"] = (L, cfg.head_dim)
        shapes["k_norm"] = (L, cfg.head_dim)
    return shapes


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies (head_dim/2,), float64, with llama3 scaling when configured."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    rs = cfg.rope_scaling
    if rs is not None:  # llama3: long wavelengths slowed by `factor`, a smooth band between
        low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
        wl = 2 * np.pi / inv
        smooth = (rs.original_max_position_embeddings / wl - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor)
        scaled = np.where(wl > low_wl, inv / rs.factor, inv)
        mid = (wl <= low_wl) & (wl >= high_wl)
        inv = np.where(mid, (1 - smooth) * inv / rs.factor + smooth * inv, scaled)
    return inv


def rope_tables(cfg: ModelConfig, n_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables (n_positions, head_dim/2) float32 for half-split RoPE."""
    ang = np.arange(n_positions, dtype=np.float64)[:, None] * rope_inv_freq(cfg)[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def default_rope_positions(cfg: ModelConfig, context_length: int | None = None) -> int:
    """Rows of the RoPE table a loaded model carries: the model's positions up to
    ROPE_TABLE_MAX_POSITIONS (its host and GPU copies stay small for million-position
    models), or as many as `context_length` asks, up to the model's positions."""
    n = min(cfg.max_position_embeddings, ROPE_TABLE_MAX_POSITIONS)
    if context_length is not None:
        n = max(n, min(int(context_length), cfg.max_position_embeddings))
    return n


def pack_weights(cfg: ModelConfig, get: Getter, rope_positions: int | None = None
                 ) -> dict[str, np.ndarray]:
    """Canonical tensors (through ``get``) -> packed float32 arrays (see module docstring)."""
    rope_positions = rope_positions or default_rope_positions(cfg)
    shapes = packed_shapes(cfg, rope_positions)
    out = {k: np.empty(s, dtype=np.float32) for k, s in shapes.items()
           if k not in ("embed", *ROPE_TABLES)}
    q, kv = cfg.q_dim, cfg.kv_dim
    f = cfg.intermediate_size
    for layer in range(cfg.n_layers):
        g = get("attn_norm", layer)
        out["wqkv"][layer, :q] = get("wq", layer) * g
        out["wqkv"][layer, q:q + kv] = get("wk", layer) * g
        out["wqkv"][layer, q + kv:] = get("wv", layer) * g
        if cfg.qkv_bias:
            out["bqkv"][layer] = np.concatenate(
                [get("bq", layer), get("bk", layer), get("bv", layer)])
        if cfg.qk_norm:
            out["q_norm"][layer] = get("q_norm", layer)
            out["k_norm"][layer] = get("k_norm", layer)
        out["wo"][layer] = get("wo", layer)
        g = get("ffn_norm", layer)
        out["w_gate_up"][layer, :f] = get("w_gate", layer) * g
        out["w_gate_up"][layer, f:] = get("w_up", layer) * g
        out["w_down"][layer] = get("w_down", layer)
    out["embed"] = np.ascontiguousarray(get("embed", None), dtype=np.float32)
    head = out["embed"] if cfg.tie_word_embeddings else get("lm_head", None)
    np.multiply(head, get("final_norm", None), out=out["lm_head"])
    out["rope_cos"], out["rope_sin"] = rope_tables(cfg, rope_positions)
    return out


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(a), np.uint16(0x7FC0), rounded)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_to_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to what `dtype` ("bfloat16" | "float16" | "float32") can hold."""
    if dtype == "bfloat16":
        return bf16_to_f32(bf16_bits(a))
    if dtype == "float16":
        return np.asarray(a, dtype=np.float32).astype(np.float16).astype(np.float32)
    if dtype == "float32":
        return np.asarray(a, dtype=np.float32)
    raise ValueError(f"unknown dtype {dtype!r}")
