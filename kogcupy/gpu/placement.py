"""Build-time work placement: which block of the grid owns which rows of each GEMV stage, and
how attention is chunked over KV positions. The kernel reads the table; nothing is decided
at run time except the attention chunk count, which follows ``attention_chunk_len``.

Every GEMV stage's rows are split into contiguous, balanced ranges (bytes per block differ by
at most one row). ``rank``/``world_size`` are the tensor-parallel coordinates: ``cfg`` is then
the rank's share (tensor_parallel.local_config: its heads, its FFN columns) and the LM-head
rows are the rank's vocabulary slice, numbered globally.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .abi import PARTITION_COLUMNS
from ..model.config import ModelConfig

ATTN_CHUNK = 1 << 16      # KV positions per attention unit at most (units stream their chunk in tiles)
ATTN_MIN_CHUNK = 32       # ... and at least (rounded up to a multiple of this; H200: 32 vs 64 +1.0-1.6%)
ATTN_TILE = 128           # positions a unit stages at a time for head_dim 128 (attn_tiling)
ATTN_MAX_CHUNKS = 64      # chunks per kv head at most (and at most the blocks per kv head)
# Chunks per kv head at n_pos positions: min(max, max(16, isqrt(n_pos * W / 128))), W the
# partials an o_proj item merges a round (attn_combine_width: ATTN_COMBINE_B a thread group of
# attention.cuh's kog_attn_combine). Every W chunks past the first W cost the item one more
# dependent L2 round trip; a longer chunk costs its unit's streaming time. H100, against 64
# chunks: Qwen2.5-0.5B +12% at position 2,000, +17% at 8,000, +7% at 32,000; SmolLM2-135M
# +4.5% / +3% at 2,000 / 8,000 (PERF.md).
ATTN_FREE_CHUNKS = 16
ATTN_CHUNK_BALANCE = 128
ATTN_COMBINE_B = 4        # partials in flight a thread of the combine (attention.cuh)
ATTN_COMBINE_P = 2        # adjacent dims of one head a thread of the combine merges (one GPU;
                          # tensor parallel 1: there the unit holding t combines, and 2 spilled);
                          # twice the groups: H100 +4-5% at position 2,000 on the small shapes


def attn_combine_dims(world_size: int) -> int:
    """KOG_ATTN_COMBINE_P: dims of one head a thread of the attention combine merges."""
    return ATTN_COMBINE_P if world_size == 1 else 1


def split_even(n_units: int, n_blocks: int) -> np.ndarray:
    """(n_blocks, 2) [begin, end) ranges covering range(n_units), sizes differing by <= 1."""
    b = np.arange(n_blocks + 1, dtype=np.int64) * n_units // n_blocks
    return np.stack([b[:-1], b[1:]], axis=1).astype(np.int32)


def attn_chunk_cap(cfg: ModelConfig) -> int:
    """Default cap on positions per attention unit (kernel KOG_ATTN_CHUNK): none in practice --
    a unit streams its chunk through shared memory tile by tile, so the chunk rule's
    attn_max_chunks units per kv head cover any context in one round of units."""
    return ATTN_CHUNK


def attn_mma(cfg: ModelConfig, arch: str = "") -> bool:
    """attention.cuh KOG_ATTN_MMA: the chunk loop on tensor cores (NVIDIA: `arch` "";
    head_dim % 16 == 0); otherwise lanes hold 8 dims of a head."""
    return not arch and cfg.head_dim % 16 == 0


def attn_tiling(cfg: ModelConfig, arch: str = "") -> tuple[int, int]:
    """(KOG_ATTN_TILE, KOG_ATTN_BUFS): positions per staged K/V tile and tiles in flight, two.
    Tensor cores: 128 positions for head_dim <= 128 (64 KB of K + V at 128), 64 for 256 (H200,
    head_dim 64: 128 positions +3 to +4% over 256, at 8000 positions too; 128 x 4 in flight
    +2%; head_dim 128 at 64 x 4 the same at short contexts, -3% at 8000). The lane layout
    (AMD): two 64 KB tiles, 256 positions for head_dim <= 64 (its tiles are whole rounds of
    512 x 8 / head_dim positions: 256 at head_dim 16)."""
    tile = ATTN_TILE * 128 // max(128 if attn_mma(cfg, arch) else 64, cfg.head_dim)
    return tile, 2


def attn_combine_groups(cfg: ModelConfig, threads: int, world_size: int) -> int:
    """Thread groups of the attention combine (the kernels' KOG_ATTN_COMBINE_S): as many
    copies of a head group's G x head_dim outputs as the block's threads hold at
    attn_combine_dims a thread, up to 4."""
    r = threads * attn_combine_dims(world_size) // (cfg.gqa_group * cfg.head_dim)
    return 4 if r >= 4 else 2 if r >= 2 else 1


def attn_combine_width(cfg: ModelConfig, threads: int, world_size: int) -> int:
    """Chunk partials the combine merges in one dependent round."""
    return attn_combine_groups(cfg, threads, world_size) * ATTN_COMBINE_B


def attention_chunk_len(n_pos: int, max_chunks: int, max_chunk: int, width: int,
                        min_chunk: int = ATTN_MIN_CHUNK) -> int:
    """Positions per attention chunk for n_pos attended positions (kernel: kog_attn_chunk_len;
    `max_chunks`: the placement's attn_max_chunks, `max_chunk`: KOG_ATTN_CHUNK, `width`:
    attn_combine_width of the model and block size)."""
    n_chunks = min(max_chunks, max(ATTN_FREE_CHUNKS, math.isqrt(n_pos * width // ATTN_CHUNK_BALANCE)))
    length = -(-n_pos // n_chunks)
    length = -(-length // min_chunk) * min_chunk
    return min(length, max_chunk)


@dataclass(frozen=True)
class Placement:
    n_blocks: int
    partition: np.ndarray          # (n_blocks, len(PARTITION_COLUMNS)) int32
    producers: dict                # stage -> number of blocks owning rows of it
    attn_max_chunks: int           # chunk rule parameter
    attn_chunks_alloc: int         # chunks per kv head the partial buffer holds
    attn_chunks: np.ndarray        # (C,) int32: chunks a kv head at n_pos = 1..C (the rule's table)
    ffn_slots: int                 # FFN units a block runs at most: static + the dynamic tail
    gate_up_dyn_begin: int         # gate/up units from here on are handed out dynamically
    lm_dyn_begin: int              # LM head rows from here on are handed out dynamically
    lm_dyn_end: int                # ... up to here (this rank's vocabulary slice ends)


def static_units(n_units: int, dyn_permille: int) -> int:
    """Units of a stage placed at build time; the last dyn_permille / 1000 go at run time."""
    return n_units - n_units * dyn_permille // 1000


def max_tp_blocks(cfg: ModelConfig, world_size: int, dyn_permille: int = 0) -> int:
    """The largest grid on which every block owns rows of every GEMV stage of every rank
    (tensor parallel; ``cfg`` is one rank's share)."""
    return min(cfg.qkv_dim, cfg.hidden_size, static_units(cfg.intermediate_size, dyn_permille),
               static_units(cfg.vocab_size // world_size, dyn_permille))


def place(cfg: ModelConfig, n_blocks: int, context_length: int, rank: int = 0,
          world_size: int = 1, min_chunk: int = ATTN_MIN_CHUNK, dyn_permille: int = 0,
          max_chunk: int | None = None, threads: int = 512) -> Placement:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} of {world_size}")
    v0, v1 = rank * cfg.vocab_size // world_size, (rank + 1) * cfg.vocab_size // world_size
    max_chunk = max_chunk or attn_chunk_cap(cfg)
    stages = {
        "qkv": cfg.qkv_dim,                  # rows of wqkv
        "o": cfg.hidden_size,                # rows of wo
        "gate_up": cfg.intermediate_size,    # interleaved (gate, up) row pairs
        "down": cfg.hidden_size,             # rows of w_down
        "lm": v1 - v0,                       # rows of lm_head (this rank's vocabulary slice)
    }
    # gate_up, lm: the last dyn_permille / 1000 of the units are handed out at run time
    dyn_begin = {k: static_units(stages[k], dyn_permille) for k in ("gate_up", "lm")}
    cols = [split_even(dyn_begin.get(k, n), n_blocks) for k, n in stages.items()]
    cols[4] = cols[4] + v0                  # global vocabulary ids
    partition = np.ascontiguousarray(np.concatenate(cols, axis=1), dtype=np.int32)
    assert partition.shape[1] == len(PARTITION_COLUMNS)
    producers = {k: int(np.count_nonzero(c[:, 1] > c[:, 0])) for k, c in zip(stages, cols)}
    if world_size > 1 and min(producers.values()) < n_blocks:
        # every block keeps x and reads every rank's partials in the stages after o_proj and
        # down; owning rows in each stage puts those reads before the partials' next version
        short = {k: n for k, n in stages.items() if producers[k] < n_blocks}
        raise ValueError(f"tensor parallel needs rows of every stage in every block; "
                         f"{short} rows are fewer than the {n_blocks} blocks: use fewer blocks")
    if dyn_permille > 0:
        producers["lm"] = n_blocks                  # every block takes part in the dynamic tail
    max_chunks = max(1, min(ATTN_MAX_CHUNKS, n_blocks // cfg.n_kv_heads))
    width = attn_combine_width(cfg, threads, world_size)
    n = np.arange(1, context_length + 1, dtype=np.int64)
    length = np.array([attention_chunk_len(k, max_chunks, max_chunk, width, min_chunk)
                       for k in range(1, context_length + 1)], dtype=np.int64)
    chunks = -(-n // length)                                    # (C,) chunks at n_pos = n
    alloc = int(np.max(chunks))
    ffn_slots = int(np.max(cols[2][:, 1] - cols[2][:, 0])) + stages["gate_up"] - dyn_begin["gate_up"]
    return Placement(n_blocks, partition, producers, max_chunks, alloc, chunks.astype(np.int32),
                     ffn_slots, dyn_begin["gate_up"], v0 + dyn_begin["lm"], v1)
