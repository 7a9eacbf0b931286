"""Random-weight models in the packed layout: GPU tests and benchmarks run on these.

The values are rounded to the storage dtype, so the float32 reference and the GPU see the
same numbers. Weights scale as 1/sqrt(fan_in) so activations stay O(1) through the layers;
``logit_scale`` widens the LM head so greedy argmax has clear margins over long runs.
"""
from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .packing import ROPE_TABLES, canonical_shape, pack_weights, round_to_dtype

# Shapes of public checkpoints, for benchmarks and tests (random weights, never downloaded).
SHAPES = {
    "llama-3.2-1b": dict(arch="llama", vocab_size=128256, hidden_size=2048,
                         intermediate_size=8192, n_layers=16, n_heads=32, n_kv_heads=8,
                         head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
                         max_position_embeddings=131072, tie_word_embeddings=True),
    "qwen3-1.7b": dict(arch="qwen3", vocab_size=151936, hidden_size=2048,
                       intermediate_size=6144, n_layers=28, n_heads=16, n_kv_heads=8,
                       head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       max_position_embeddings=40960, tie_word_embeddings=True),
    "llama-3.1-8b": dict(arch="llama", vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, n_layers=32, n_heads=32, n_kv_heads=8,
                         head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                         max_position_embeddings=131072, tie_word_embeddings=False),
    "smollm2-135m": dict(arch="llama", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, n_layers=30, n_heads=9, n_kv_heads=3,
                         head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(arch="qwen2", vocab_size=151936, hidden_size=896,
                         intermediate_size=4864, n_layers=24, n_heads=14, n_kv_heads=2,
                         head_dim=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         max_position_embeddings=32768, tie_word_embeddings=True),
}


def shape_config(name: str, **overrides) -> ModelConfig:
    return ModelConfig(**{**SHAPES[name], **overrides})


def random_packed_weights(cfg: ModelConfig, seed: int = 0, dtype: str = "bfloat16",
                          logit_scale: float = 1.0, rope_positions: int | None = None
                          ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def get(name, layer):
        shape = canonical_shape(cfg, name)
        if name in ("attn_norm", "ffn_norm", "final_norm", "q_norm", "k_norm"):
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        if name in ("bq", "bk", "bv"):
            return (0.1 * rng.standard_normal(shape)).astype(np.float32)
        if name == "embed":
            return rng.standard_normal(shape, dtype=np.float32)
        scale = 1.0 / np.sqrt(shape[-1])
        if name == "lm_head":
            scale *= logit_scale
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

    if cfg.tie_word_embeddings and logit_scale != 1.0:
        raise ValueError("logit_scale needs an untied LM head")
    packed = pack_weights(cfg, get, rope_positions)
    for k, v in packed.items():
        if k not in ROPE_TABLES:
            packed[k] = round_to_dtype(v, dtype)
    return packed
