"""The monokernel's build plan (grid, tuning decisions, placement, shared memory) on the CPU."""
from __future__ import annotations

import pytest
from dataclasses import replace

from kogcupy.gpu import kernels
from kogcupy.gpu.build_plan import build_plan, smem_floats
from kogcupy.errors import DeviceError
from kogcupy.gpu.placement import max_tp_blocks
from kogcupy.model.random_weights import shape_config
from kogcupy.gpu.tensor_parallel import local_config

H200_SMS = 132


@pytest.fixture(autouse=True)
def _plan_without_env_tuning(monkeypatch):
    """The plan's own choices: a developer's KOGCUPY_TUNING set aside for these tests."""
    monkeypatch.setattr(kernels, "ENV_TUNING", {})
    monkeypatch.setattr(kernels, "DEFAULT_TUNING", dict(kernels.BUILTIN_TUNING))


def test_one_gpu_places_every_unit_statically_and_one_block_per_sm():
    # (greedy output the same bits run to run: SYNC.md) unless asked; tensor parallel keeps the tail
    cfg = shape_config("llama-3.2-1b")
    p = build_plan(cfg, H200_SMS, 4096)
    assert p.n_blocks == H200_SMS
    for c in (cfg, shape_config("smollm2-135m")):
        q = build_plan(c, H200_SMS, 4096)
        assert q.tuning["KOG_DYN_PERMILLE"] == 0
        assert q.placement.gate_up_dyn_begin == c.intermediate_size
        assert q.placement.lm_dyn_begin == q.placement.lm_dyn_end == c.vocab_size
        assert build_plan(c, H200_SMS, 4096, tuning={"KOG_DYN_PERMILLE": 50}).tuning["KOG_DYN_PERMILLE"] == 50
    tp = build_plan(local_config(cfg, 2), H200_SMS, 4096, world=2)
    assert tp.tuning["KOG_DYN_PERMILLE"] == kernels.DEFAULT_TUNING["KOG_DYN_PERMILLE"] > 0
    assert p.placement.partition.shape[0] == H200_SMS
    assert p.smem_floats >= max(cfg.hidden_size, cfg.intermediate_size, cfg.q_dim)
    assert p.smem_floats * 4 < p.smem_bytes <= 227 * 1024
    assert "KOG_HOOKS" not in p.tuning
    assert build_plan(cfg, H200_SMS, 4096, hooks=True).tuning["KOG_HOOKS"] == 1


def test_env_tuning_counts_as_asked(monkeypatch):
    # KOGCUPY_TUNING's knobs (kernels.ENV_TUNING) are not overridden by the per-model choices
    cfg = shape_config("smollm2-135m")
    env = {"KOG_DYN_PERMILLE": 50, "KOG_IN_COPIES": 1}
    monkeypatch.setattr(kernels, "ENV_TUNING", env)
    monkeypatch.setattr(kernels, "DEFAULT_TUNING", {**kernels.DEFAULT_TUNING, **env})
    p = build_plan(cfg, H200_SMS, 4096)
    assert (p.tuning["KOG_DYN_PERMILLE"], p.tuning["KOG_IN_COPIES"]) == (50, 1)
    assert build_plan(cfg, H200_SMS, 4096, tuning={"KOG_IN_COPIES": 4}).tuning["KOG_IN_COPIES"] == 4
    # one the build cannot honour is an error that names the variable
    monkeypatch.setattr(kernels, "ENV_TUNING", {"KOG_CLUSTER": 2})
    with pytest.raises(DeviceError, match="KOG_CLUSTER=2 .set by KOGCUPY_TUNING. needs"):
        build_plan(cfg, H200_SMS, 4096, arch="gfx942")
    monkeypatch.setattr(kernels, "ENV_TUNING", {})
    p = build_plan(cfg, H200_SMS, 4096)
    assert (p.tuning["KOG_DYN_PERMILLE"], p.tuning["KOG_IN_COPIES"]) == (0, 2)


def test_gemv_loads_no_more_than_a_row_of_x_needs():
    loads = lambda shape, **kw: build_plan(shape_config(shape), H200_SMS, 4096, **kw).tuning.get(
        "KOG_GEMV_MAX_LOADS", kernels.DEFAULT_TUNING["KOG_GEMV_MAX_LOADS"])
    assert kernels.DEFAULT_TUNING["KOG_GEMV_MAX_LOADS"] == 4
    assert loads("smollm2-135m") == 3                      # hidden 576: 72 chunks, 3 warp loads
    for shape in ("qwen2.5-0.5b", "llama-3.2-1b", "llama-3.1-8b"):
        assert loads(shape) == 4
    assert loads("smollm2-135m", tuning={"KOG_GEMV_MAX_LOADS": 4}) == 4
    assert loads("smollm2-135m", arch="gfx942") == 4       # not measured on a 64-wide wave
    tiny = replace(shape_config("smollm2-135m"), hidden_size=128)
    assert build_plan(tiny, H200_SMS, 4096).tuning["KOG_GEMV_MAX_LOADS"] == 3   # 2: not measured


def test_tensor_parallel_share_gets_a_smaller_grid_and_x_per_block():
    cfg = shape_config("qwen3-1.7b")
    loc = local_config(cfg, 4)
    p = build_plan(loc, H200_SMS, 4096, rank=1, world=4)
    dyn = p.tuning["KOG_DYN_PERMILLE"]
    assert p.n_blocks == max(1, min(H200_SMS, max_tp_blocks(loc, 4, dyn)))
    one = build_plan(loc, p.n_blocks, 4096)             # the same grid on one GPU
    assert p.smem_bytes - one.smem_bytes >= 4 * loc.hidden_size   # x_full


def test_block_pairs_where_the_gpu_and_the_model_have_them():
    # KOG_CLUSTER (down.cuh): a large model on one NVIDIA GPU of sm_90+ with an even grid
    big, small = shape_config("llama-3.2-1b"), shape_config("smollm2-135m")
    assert build_plan(big, H200_SMS, 4096).tuning["KOG_CLUSTER"] == 2
    for kw in ({"clusters": False}, {"arch": "gfx942"}, {"blocks": 131}):
        assert build_plan(big, H200_SMS, 4096, **kw).tuning["KOG_CLUSTER"] == 1, kw
    loc = local_config(shape_config("qwen3-1.7b"), 2)
    assert build_plan(loc, H200_SMS, 4096, rank=0, world=2).tuning["KOG_CLUSTER"] == 1
    assert build_plan(small, H200_SMS, 4096).tuning["KOG_CLUSTER"] == 1     # SmolLM2: -3% in pairs
    assert build_plan(small, H200_SMS, 4096, tuning={"KOG_CLUSTER": 2}).tuning["KOG_CLUSTER"] == 2
    with pytest.raises(DeviceError, match="KOG_CLUSTER=2 needs"):
        build_plan(big, H200_SMS, 4096, clusters=False, tuning={"KOG_CLUSTER": 2})
    for bad in (0, 3, 4):
        with pytest.raises(DeviceError, match="1 .single blocks. or 2"):
            build_plan(big, H200_SMS, 4096, tuning={"KOG_CLUSTER": bad})


def test_in_sum_copies_for_single_blocks():
    # KOG_IN_COPIES (sync.cuh): 2 where single blocks add to the in sums on one NVIDIA GPU
    big, small = shape_config("llama-3.2-1b"), shape_config("smollm2-135m")
    copies = lambda cfg, **kw: build_plan(cfg, H200_SMS, 4096, **kw).tuning["KOG_IN_COPIES"]
    assert copies(small) == 2 and copies(shape_config("qwen2.5-0.5b")) == 2
    assert copies(big) == 1                                  # pairs: 2 copies neutral, 4 slower
    assert copies(big, blocks=131) == 2                      # an odd grid: single blocks
    assert copies(small, arch="gfx942") == 1                 # not measured on AMD
    assert copies(small, tuning={"KOG_CLUSTER": 2}) == 1
    assert copies(small, tuning={"KOG_IN_COPIES": 5}) == 5
    assert copies(local_config(shape_config("qwen3-1.7b"), 2), rank=0, world=2) == 1
    for bad in (0, 9):
        with pytest.raises(DeviceError, match="1 to 8 copies"):
            copies(small, tuning={"KOG_IN_COPIES": bad})


def test_poll_sentinel_on_one_nvidia_gpu():
    # KOG_POLL_SENTINEL (gemv.cuh): one NVIDIA GPU
    on = lambda cfg, **kw: build_plan(cfg, H200_SMS, 4096, **kw).tuning["KOG_POLL_SENTINEL"]
    assert on(shape_config("qwen2.5-0.5b")) == 1 and on(shape_config("llama-3.2-1b")) == 1
    assert on(shape_config("smollm2-135m")) == 1
    assert on(shape_config("smollm2-135m"), tuning={"KOG_POLL_SENTINEL": 0}) == 0
    assert on(shape_config("llama-3.2-1b"), arch="gfx942") == 0
    assert on(local_config(shape_config("qwen3-1.7b"), 2), rank=0, world=2) == 0
    with pytest.raises(DeviceError, match="0 or 1"):
        on(shape_config("llama-3.2-1b"), tuning={"KOG_POLL_SENTINEL": 2})


def test_refusals():
    cfg = shape_config("llama-3.2-1b")
    with pytest.raises(DeviceError, match="at least 8 blocks"):
        build_plan(cfg, H200_SMS, 4096, blocks=4)


def test_ffn_slots_hold_every_unit_a_block_can_run():
    # down_residual multiplies the activations of the units its block ran: its static range and
    # any of the dynamic tail (gate_up.cuh KOG_FFN_SLOTS); the FFN's shared memory counts them
    from kogcupy.gpu.placement import place
    cfg = shape_config("llama-3.2-1b")
    for dyn in (0, 100, 1000):
        pl = place(cfg, H200_SMS, 4096, dyn_permille=dyn)
        static = pl.partition[:, 5] - pl.partition[:, 4]
        assert pl.ffn_slots == static.max() + cfg.intermediate_size - pl.gate_up_dyn_begin
        assert static.sum() == pl.gate_up_dyn_begin
    p = build_plan(cfg, H200_SMS, 4096)
    assert smem_floats(cfg, ffn_slots=p.placement.ffn_slots) <= p.smem_floats < smem_floats(cfg)


def test_one_gpu_grid_fits_the_sum_part_count():
    # the next layer's input sum gets up to one part per block; its words count parts in 10 bits
    cfg = shape_config("llama-3.2-1b")
    assert build_plan(cfg, 2048, 4096, blocks=1023).n_blocks == 1023
    with pytest.raises(DeviceError, match="at most 1023 blocks"):
        build_plan(cfg, 2048, 4096, blocks=1024)


def test_smem_floats_covers_attention_and_sampler():
    from kogcupy.gpu.build_plan import sample_smem_floats
    cfg = shape_config("smollm2-135m")
    sl = -(-cfg.vocab_size // 132)                     # its slice of the vocabulary (132 blocks)
    assert sample_smem_floats(cfg) == 3 * 2048 + sl + -(-sl // 32)
    assert smem_floats(cfg) >= sample_smem_floats(cfg) and smem_floats(cfg) % 4 == 0
    few = -(-cfg.vocab_size // 2)                      # 2 blocks: the slice dominates
    assert smem_floats(cfg, n_blocks=2) >= 3 * 2048 + few + -(-few // 32) > smem_floats(cfg)
    p = build_plan(cfg, H200_SMS, 4096, blocks=64)
    assert p.tuning["KOG_SAMPLE_SLICE"] * 64 >= cfg.vocab_size > (p.tuning["KOG_SAMPLE_SLICE"] - 1) * 64
    big = shape_config("qwen3-1.7b")                   # 151,936 ids over 9 blocks: ~94 KB a block
    with pytest.raises(DeviceError, match="sampler's slice of the vocabulary"):
        build_plan(big, H200_SMS, 4096, blocks=9, smem_limit=64 * 1024)


def test_mi300x_grid_is_the_reference_designs():
    # gfx942 (304 CUs): 256 blocks of 512 = (64, 8) threads, 32 on each XCD (topology.py)
    from kogcupy.gpu import topology as T
    from kogcupy.gpu.build_plan import THREADS
    cfg = shape_config("qwen3-1.7b")
    p = build_plan(cfg, 304, 4096, arch="gfx942:sramecc+:xnack-")
    assert p.n_blocks == T.MI300X_GRID == 256 and THREADS == 64 * 8
    assert p.placement.partition.shape[0] == 256
    assert build_plan(cfg, 304, 4096).n_blocks == 304          # another target: one per CU


@pytest.mark.parametrize("shape", ["llama-3.2-1b", "qwen3-1.7b", "smollm2-135m", "llama-3.1-8b",
                                   "qwen2.5-0.5b"])
def test_attention_is_one_round_of_streaming_units(shape):
    # a unit streams its chunk in tiles, so the chunk rule's units per kv head cover any
    # context in one round of units; two K/V tiles of 128 positions (at most 64 KB) fit in
    # shared memory
    from kogcupy.gpu.placement import attention_chunk_len, attn_chunk_cap, attn_combine_width, attn_tiling
    cfg = shape_config(shape)
    tile, bufs = attn_tiling(cfg)
    assert (tile, bufs) == (128, 2) and tile * cfg.head_dim * 2 * 2 <= 64 * 1024
    p = build_plan(cfg, H200_SMS, 131072)
    assert p.smem_bytes <= 227 * 1024
    units = cfg.n_kv_heads * p.placement.attn_max_chunks
    assert units <= H200_SMS and p.placement.attn_chunks_alloc == p.placement.attn_max_chunks
    n = 131072
    chunk = attention_chunk_len(n, p.placement.attn_max_chunks, attn_chunk_cap(cfg),
                                attn_combine_width(cfg, 512, 1))
    assert -(-n // chunk) <= p.placement.attn_max_chunks and chunk > tile   # many tiles a unit


def test_attention_tiles_shrink_to_the_shared_memory_limit():
    # a GPU with 64 KB a block (AMD): the K/V tiles halve until the plan fits; HIP stages one
    # tile at a time (its copies are synchronous); an explicit tuning value is kept as asked
    cfg = shape_config("llama-3.2-1b")
    h200 = build_plan(cfg, H200_SMS, 4096, smem_limit=232448)
    assert (h200.tuning["KOG_ATTN_TILE"], h200.tuning["KOG_ATTN_BUFS"]) == (128, 2)
    amd = build_plan(cfg, 304, 4096, arch="gfx942", smem_limit=64 * 1024)
    assert amd.smem_bytes <= 64 * 1024 and amd.tuning["KOG_ATTN_BUFS"] == 1
    assert amd.tuning["KOG_ATTN_TILE"] == 128                  # one 32 KB tile
    assert build_plan(cfg, 304, 4096, arch="gfx942", smem_limit=64 * 1024,
                      tuning={"KOG_ATTN_TILE": 256}).tuning["KOG_ATTN_TILE"] == 256


def test_gpu_long_prompt_test_streams_several_tiles():
    # tests/test_gpu_monokernel.py::test_long_prompt_multi_chunk_attention at 3 blocks: the
    # head_dim-128 model's units stream more than one default tile
    from kogcupy.gpu.placement import attention_chunk_len, attn_combine_width, attn_tiling
    from kogcupy.model.config import ModelConfig
    cfg = ModelConfig(arch="llama", vocab_size=800, hidden_size=384, intermediate_size=512,
                      n_layers=3, n_heads=3, n_kv_heads=1, head_dim=128, rms_norm_eps=1e-5,
                      rope_theta=10000.0, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    p = build_plan(cfg, 3, 1024, blocks=3)
    assert attention_chunk_len(700, p.placement.attn_max_chunks, p.attn_chunk,
                               attn_combine_width(cfg, 512, 1)) > attn_tiling(cfg)[0]


def test_attention_tile_is_16_positions_a_warp():
    # NVIDIA (tensor cores): a warp takes 16 positions of a tile, so a tile is a multiple of 16
    # and at most 16 x the block's warps; a warp's merged state must fit its staging buffers
    from kogcupy.errors import DeviceError
    cfg = shape_config("llama-3.2-1b")
    assert build_plan(cfg, H200_SMS, 4096, tuning={"KOG_ATTN_TILE": 48}).tuning["KOG_ATTN_TILE"] == 48
    for tile in (40, 512):
        with pytest.raises(DeviceError, match="multiple of 16 positions, at most 256"):
            build_plan(cfg, H200_SMS, 4096, tuning={"KOG_ATTN_TILE": tile})
    wide = replace(cfg, n_heads=cfg.n_kv_heads * 16, head_dim=16)     # 16 heads a kv head
    with pytest.raises(DeviceError, match="merged state"):
        build_plan(wide, H200_SMS, 4096, tuning={"KOG_ATTN_TILE": 160, "KOG_ATTN_BUFS": 1})


def test_attention_tile_must_be_whole_warp_rounds_on_amd():
    # AMD (lanes hold 8 dims of a head): a tile is whole rounds of the warps (threads * 8 /
    # head_dim positions: 64 at head_dim 64), a warp's merged state must fit its staging area,
    # and with one q head a kv head a tile is one or an even number of warp rounds
    from kogcupy.gpu.build_plan import attn_tile_problem
    cfg = shape_config("llama-3.2-1b")
    assert attn_tile_problem(cfg, 64, 2, arch="gfx1100") is None
    assert "multiple of 64" in attn_tile_problem(cfg, 32, 2, arch="gfx1100")
    assert "merged state" in attn_tile_problem(cfg, 64, 1, arch="gfx1100")
    mha = replace(cfg, n_kv_heads=cfg.n_heads)                  # one q head a kv head
    assert attn_tile_problem(mha, 128, 2, arch="gfx1100") is None
    assert "even number" in attn_tile_problem(mha, 192, 2, arch="gfx1100")


def test_amd_plans_count_64_lane_wavefronts():
    # a 64-lane round covers all 4 q heads of a Llama-3.1-8B kv head: no saved head-set state,
    # so its 64 KB plan keeps 64-position tiles (counting 32 lanes it would shrink them to 32,
    # which the kernel cannot compile)
    from kogcupy.gpu.build_plan import attn_tile_problem
    cfg = shape_config("llama-3.1-8b")
    ffn = dict(ffn_slots=1, down_depth=1)        # (the FFN term as on such a grid: small)
    assert (smem_floats(cfg, 64, 1, warp=64, arch="gfx942", **ffn)
            < smem_floats(cfg, 64, 1, warp=32, arch="gfx1100", **ffn))
    amd = build_plan(cfg, 304, 4096, arch="gfx942", smem_limit=64 * 1024)
    tile, bufs = amd.tuning["KOG_ATTN_TILE"], amd.tuning["KOG_ATTN_BUFS"]
    assert amd.smem_bytes <= 64 * 1024 and (tile, bufs) == (64, 1)
    assert attn_tile_problem(cfg, tile, bufs, warp=64, arch="gfx942") is None


def test_attention_tiles_per_layout():
    # tensor cores (NVIDIA): 128-position tiles up to head_dim 128; the lane layout (AMD) keeps
    # whole warp rounds: 256 positions at head_dim 16 (512 threads x 8 / 16)
    from kogcupy.gpu.build_plan import attn_tile_problem
    from kogcupy.gpu.placement import attn_tiling
    tiny = replace(shape_config("llama-3.2-1b"), n_heads=4, n_kv_heads=2, head_dim=16)
    assert attn_tiling(tiny) == (128, 2) and attn_tiling(tiny, "gfx942") == (256, 2)
    assert build_plan(tiny, 304, 256, arch="gfx942", smem_limit=64 * 1024).tuning["KOG_ATTN_TILE"] == 256
    # the combine stashes its thread groups' state in the staging area: a tile too small for
    # it is refused, not left to a static_assert
    wide = replace(shape_config("llama-3.2-1b"), n_heads=8, n_kv_heads=2, head_dim=32)
    assert "combine" in attn_tile_problem(wide, 16, 2) and attn_tile_problem(wide, 128, 2) is None


def test_attention_chunk_rule():
    # placement.attention_chunk_len (the kernel's kog_attn_chunk_len) and the plan's table of
    # every position (its chunk counts) agree; up to 16 chunks a kv head, then
    # isqrt(n_pos * W / 128) (W: the partials the combine merges a round), at most the plan's
    # max_chunks
    from kogcupy.gpu.placement import attention_chunk_len, attn_combine_width
    chunks = lambda n, p, w: -(-n // attention_chunk_len(n, p.placement.attn_max_chunks, p.attn_chunk, w))
    for shape, width, table in (("qwen2.5-0.5b", 8, {288: 9, 512: 16, 600: 10, 2000: 16, 8000: 21,
                                                      32000: 44, 131072: 64}),
                                ("smollm2-135m", 16, {2000: 16, 8000: 28, 32000: 44}),
                                ("llama-3.2-1b", 16, {288: 9, 2000: 16, 131072: 16})):
        cfg = shape_config(shape)
        p = build_plan(cfg, H200_SMS, 131072)
        assert attn_combine_width(cfg, 512, 1) == width
        assert {n: chunks(n, p, width) for n in table} == table, shape
        every = [chunks(n, p, width) for n in range(1, 131073)]
        assert p.placement.attn_chunks.tolist() == every, shape
        assert p.placement.attn_chunks_alloc == max(every) <= p.placement.attn_max_chunks


def test_zero_early_on_smollm2_sized_models_only():
    # KOG_ZERO_EARLY (o_proj.cuh): hidden < 5 rows a block, one NVIDIA GPU
    on = lambda name, **kw: build_plan(shape_config(name), H200_SMS, 4096, **kw).tuning["KOG_ZERO_EARLY"]
    assert on("smollm2-135m") == 1                                    # 576 < 5 * 132
    assert on("qwen2.5-0.5b") == 0 and on("llama-3.2-1b") == 0        # 896, 2048
    assert on("smollm2-135m", tuning={"KOG_ZERO_EARLY": 0}) == 0
    assert on("qwen2.5-0.5b", tuning={"KOG_ZERO_EARLY": 1}) == 1
    assert on("smollm2-135m", arch="gfx942") == 0
    assert build_plan(shape_config("smollm2-135m"), H200_SMS, 4096, world=2).tuning["KOG_ZERO_EARLY"] == 0
    with pytest.raises(DeviceError, match="0 or 1"):
        on("smollm2-135m", tuning={"KOG_ZERO_EARLY": 2})


def test_early_tiles_and_down_depth_on_pairs_up_to_hidden_2048():
    # KOG_GATE_UP_EARLY (gemv.cuh): 1 tile before the wait on small models with more FFN
    # columns than the grid has warps, else 2
    on = lambda name, **kw: build_plan(shape_config(name), H200_SMS, 4096, **kw).tuning["KOG_GATE_UP_EARLY"]
    assert on("qwen3-1.7b") == 2 and on("llama-3.2-1b") == 2          # pairs, hidden 2048
    assert on("llama-3.1-8b") == 2                                    # pairs, hidden 4096
    assert on("smollm2-135m") == 2                                    # 1,536 columns, 2,112 warps
    assert on("qwen2.5-0.5b") == 1                                    # 4,864 columns
    assert on("qwen2.5-0.5b", blocks=320) == 2                        # 5,120 warps
    assert on("qwen2.5-0.5b", arch="gfx942") == 2
    assert on("qwen3-1.7b", tuning={"KOG_CLUSTER": 1}) == 2
    assert on("smollm2-135m", tuning={"KOG_CLUSTER": 2}) == 2          # small: not measured
    assert on("qwen3-1.7b", tuning={"KOG_GATE_UP_EARLY": 1}) == 1
    assert on("qwen2.5-0.5b", tuning={"KOG_GATE_UP_EARLY": 2}) == 2
    assert on("qwen3-1.7b", arch="gfx942") == 2
    assert build_plan(shape_config("qwen3-1.7b"), H200_SMS, 4096, world=2).tuning["KOG_GATE_UP_EARLY"] == 2
    # KOG_DOWN_DEPTH 8 on every NVIDIA build unless asked (HIP: 1)
    depth = lambda name, **kw: build_plan(shape_config(name), H200_SMS, 4096, **kw).tuning["KOG_DOWN_DEPTH"]
    assert depth("qwen3-1.7b") == 8 and depth("llama-3.2-1b") == 8
    assert depth("llama-3.1-8b") == 8 and depth("qwen2.5-0.5b") == 8 and depth("smollm2-135m") == 8
    assert depth("qwen3-1.7b", tuning={"KOG_CLUSTER": 1}) == 8 and depth("qwen3-1.7b", arch="gfx942") == 1
    assert depth("qwen3-1.7b", tuning={"KOG_DOWN_DEPTH": 12}) == 12
    assert depth("qwen3-1.7b", world=2) == 8                          # tensor parallel
    for bad in (0, 17):
        with pytest.raises(DeviceError, match="1 to 16 rows"):
            depth("qwen3-1.7b", tuning={"KOG_DOWN_DEPTH": bad})
    with pytest.raises(DeviceError, match="1 or 2 tiles"):
        on("qwen3-1.7b", tuning={"KOG_GATE_UP_EARLY": 0})
    # KOG_QKV_EARLY: the same rule for attn_norm_qkv's tiles
    # on GPUs with an H200's memory only (an H100's 79 GiB: 2)
    qkv = lambda name, memory_gib=139.8, **kw: build_plan(shape_config(name), H200_SMS, 4096, memory_gib=memory_gib,
                                                          **kw).tuning["KOG_QKV_EARLY"]
    assert qkv("qwen3-1.7b") == 1 and qkv("llama-3.2-1b") == 1
    assert qkv("qwen3-1.7b", memory_gib=79.1) == 2 and qkv("llama-3.2-1b", memory_gib=0) == 2
    assert qkv("llama-3.1-8b") == 2 and qkv("smollm2-135m") == 2 and qkv("qwen2.5-0.5b") == 2
    assert qkv("qwen3-1.7b", tuning={"KOG_CLUSTER": 1}) == 2 and qkv("qwen3-1.7b", arch="gfx942") == 2
    assert qkv("qwen3-1.7b", world=2) == 2 and qkv("qwen3-1.7b", tuning={"KOG_QKV_EARLY": 2}) == 2
    assert qkv("llama-3.1-8b", tuning={"KOG_QKV_EARLY": 1}) == 1
    with pytest.raises(DeviceError, match="1 or 2 tiles"):
        qkv("qwen3-1.7b", tuning={"KOG_QKV_EARLY": 3})


def test_oproj_spare_on_small_models_only():
    # KOG_OPROJ_SPARE (o_proj.cuh): the small models (hidden < 8 rows a block) on one NVIDIA GPU
    on = lambda name, **kw: build_plan(shape_config(name), H200_SMS, 4096, **kw).tuning["KOG_OPROJ_SPARE"]
    assert on("smollm2-135m") == 1 and on("qwen2.5-0.5b") == 1       # hidden 576, 896
    assert on("llama-3.2-1b") == 0 and on("qwen3-1.7b") == 0
    assert on("smollm2-135m", tuning={"KOG_OPROJ_SPARE": 0}) == 0
    assert on("smollm2-135m", arch="gfx942") == 0
    with pytest.raises(DeviceError, match="0 or 1"):
        on("smollm2-135m", tuning={"KOG_OPROJ_SPARE": 2})
