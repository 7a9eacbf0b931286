"""The build plan of a monokernel: the grid, the tuning values the kernel is compiled with,
the work placement and the shared-memory layout, decided once per backend from the model
share and the GPU (no CuPy needed: CPU tests check it).

    plan = build_plan(local_cfg, n_sms=132, context_length=4096)
    plan.n_blocks, plan.tuning, plan.placement, plan.smem_bytes

The shared-memory sizes mirror the kernel's own constants (named next to each term); the
kernel's static_asserts (monokernel.cu) refuse a build whose layout does not fit them.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import abi, kernels
from ..model.config import ModelConfig
from ..errors import DeviceError
from .topology import MI300X_GRID
from .placement import (ATTN_MIN_CHUNK, Placement, attn_chunk_cap, attn_combine_groups, attn_mma,
                        attn_tiling, max_tp_blocks, place)

THREADS = 512
SMALL_ROWS = 8               # a model with fewer rows of x than this a block is `small` (build_plan)
SUM_MAX_PARTS = 1 << 10      # sync.cuh KOG_SUM_COUNT_BITS: parts a residual-sum word can count


def wave_size(arch: str) -> int:
    """Lanes of a warp: 64 on CDNA (gfx9*, `arch` = gcnArchName), 32 on NVIDIA ("") and RDNA."""
    return 64 if arch.startswith("gfx9") else 32


def _attn_lanes(cfg: ModelConfig, threads: int, warp: int) -> tuple[int, int, int]:
    """attention.cuh's lane layout: (heads a warp round covers HG, head sets NHS, positions a
    round PPR); a lane holds 8 dims of one head (KOG_ATTN_HG / _NHS / _PPR)."""
    g, lpp = cfg.gqa_group, cfg.head_dim // 8
    hg = min(g, warp // lpp)
    hgp = 1 << (hg - 1).bit_length()
    return hg, -(-g // hg), warp // (lpp * hgp)


def attn_tile_problem(cfg: ModelConfig, tile: int, bufs: int, threads: int = THREADS,
                      warp: int = 32, arch: str = "", world: int = 1) -> str | None:
    """Why attention.cuh cannot compile K/V tiles of `tile` positions x `bufs`, or None."""
    hd, g = cfg.head_dim, cfg.gqa_group
    gh = g * hd                                     # the combine's thread groups stash their
    s = attn_combine_groups(cfg, threads, world)    # state in the tiles
    if 3 * (s - 1) * gh > bufs * tile * hd:
        return (f"{tile} positions x {bufs} buffers leave the combine too little space "
                f"({3 * (s - 1)} x {g} heads x {hd} floats)")
    if attn_mma(cfg, arch):                         # a warp takes 16 positions of a tile
        if tile % 16 or tile // 16 > threads // warp:
            return (f"a K/V tile must be a multiple of 16 positions, at most {16 * threads // warp} "
                    f"(16 for each of {threads // warp} warps)")
        if g * (hd + 2) > bufs * 16 * hd:
            return (f"{bufs} buffers leave a 16-position group too little staging space for its "
                    f"merged state ({g} heads x {hd + 2} floats)")
        return None
    min_tile = threads * 8 // hd
    if tile % min_tile:
        return (f"a K/V tile must be a multiple of {min_tile} positions "
                f"({threads} threads x 8 / head_dim {hd})")
    _, _, ppr = _attn_lanes(cfg, threads, warp)
    rounds = tile * warp // threads // ppr          # a warp's rounds a tile (two positions each)
    if rounds > 2 and rounds % 2:
        return f"a K/V tile must be an even number of {min_tile}-position rounds here"
    if g * (hd + 2) > bufs * (tile * warp // threads) * hd:
        return (f"{tile} positions x {bufs} buffers leave a warp too little staging space for its "
                f"merged state ({g} heads x {hd + 2} floats)")
    return None


def sample_slice(cfg: ModelConfig, n_blocks: int = 132) -> int:
    """KOG_SAMPLE_SLICE: vocabulary ids a block holds in the sampler's rounds (sampling.cuh)."""
    return -(-cfg.vocab_size // n_blocks)


def sample_smem_floats(cfg: ModelConfig, n_blocks: int = 132) -> int:
    """sampling.cuh KOG_SAMPLE_SMEM_FLOATS: histograms, seen-id bits, the vocabulary slice."""
    sl = sample_slice(cfg, n_blocks)
    return 3 * 2048 + -(-sl // 32) + sl


def smem_floats(cfg: ModelConfig, tile: int | None = None, bufs: int | None = None,
                threads: int = THREADS, warp: int = 32, ffn_slots: int | None = None,
                down_depth: int | None = None, arch: str = "", n_blocks: int = 132) -> int:
    """KOG_SMEM_FLOATS: the largest per-stage working set (activation vector, attention unit,
    sampler histograms + vocabulary slice, the FFN's x + down partials + activations + row
    staging), rounded to 16 bytes. `tile`, `bufs`: KOG_ATTN_TILE / _BUFS; `ffn_slots`:
    KOG_FFN_SLOTS (default: the FFN width, an upper bound); `down_depth`: KOG_DOWN_DEPTH
    (default: kernels.py's); `n_blocks`: the grid (the sampler's slice)."""
    default_tile, default_bufs = attn_tiling(cfg, arch)
    tile, bufs = tile or default_tile, bufs or default_bufs
    g, hd = cfg.gqa_group, cfg.head_dim
    mma = attn_mma(cfg, arch)
    nhs = 1 if mma else _attn_lanes(cfg, threads, warp)[1]
    attn = (g * hd * 2 + 2 * hd + -(-2 * g // 4) * 4 + hd
            + bufs * tile * hd                      # attention.cuh KOG_ATTN_SMEM_FLOATS
            + (nhs * 10 * threads if nhs > 1 else 0)
            + (-(-g // 8) * hd * 8 if mma else 0))  # q^T's mma fragments
    sample = sample_smem_floats(cfg, n_blocks)
    h, chunks = cfg.hidden_size, cfg.hidden_size // 8
    groups = 1 if chunks >= threads else threads // chunks
    slots = cfg.intermediate_size if ffn_slots is None else ffn_slots
    ffn = (-(-(h + groups * h + 2 * slots) // 4) * 4                           # gate_up.cuh KOG_FFN_SMEM_FLOATS
           + (down_depth or kernels.DEFAULT_TUNING["KOG_DOWN_DEPTH"]) * 4 * threads
           * -(-chunks // threads))
    n = max(cfg.hidden_size, cfg.intermediate_size, cfg.q_dim, attn, sample, ffn)
    return -(-n // 4) * 4


@dataclass
class BuildPlan:
    n_blocks: int                # grid: co-resident blocks
    tuning: dict                 # -D tuning values (over kernels.DEFAULT_TUNING), KOG_FFN_SLOTS
    placement: Placement         # which block owns which rows / heads / chunks
    attn_chunk: int              # KOG_ATTN_CHUNK
    smem_floats: int             # KOG_SMEM_FLOATS
    smem_bytes: int              # dynamic shared memory per block


def _knob(tuning: dict, name: str) -> int:
    return int(tuning.get(name, kernels.DEFAULT_TUNING.get(name, 0)))


def _from_env(name: str, caller: dict | None) -> str:
    """' (set by KOGCUPY_TUNING)' for a knob the variable asked for, for its error message."""
    env = name in kernels.ENV_TUNING and name not in (caller or {})
    return " (set by KOGCUPY_TUNING)" if env else ""


H200_CLASS_GIB = 100     # memory_gib from which build_plan takes a GPU for an H200 (141 GB)


def _flag(tuning: dict, name: str, caller: dict | None, values=(0, 1), what: str = "0 or 1") -> int:
    """A knob of a few values (0 / 1 unless `values` says), asked for or the default; any other
    value is refused, the message saying `what` it takes."""
    v = _knob(tuning, name)
    if v not in values:
        raise DeviceError(f"{name}={v}{_from_env(name, caller)}: {what}")
    return v


def build_plan(lcfg: ModelConfig, n_sms: int, context_length: int, threads: int = THREADS,
               blocks: int | None = None, tuning: dict | None = None, rank: int = 0,
               world: int = 1, hooks: bool = False, arch: str = "",
               smem_limit: int | None = None, clusters: bool = True,
               memory_gib: float = 0.0) -> BuildPlan:
    """`lcfg`: this GPU's share of the model (all of it on one GPU); `arch` the AMD target
    (gcnArchName), "" on NVIDIA; `smem_limit` the shared memory a block may have (bytes):
    the attention's K/V tiles shrink to fit it unless `tuning` sets them; `clusters`: the GPU
    launches thread-block clusters (NVIDIA, compute capability 9.0 and later); `memory_gib`
    the GPU's memory (0: unknown), which tells an H200 from an H100 where they differ."""
    if arch.startswith("gfx942") and n_sms >= MI300X_GRID:
        n_sms = MI300X_GRID      # the MI300X grid: 32 blocks on each of its 8 XCDs (topology.py)
    caller, tuning = tuning, {**kernels.ENV_TUNING, **(tuning or {})}   # the variable's count as asked
    if hooks:
        tuning["KOG_HOOKS"] = 1               # the stage timings / dumps are compiled in
    # a small model's stages are too short for the cluster barriers (SmolLM2: -3% in pairs) and
    # for o_proj on every block (below)
    small = world == 1 and lcfg.hidden_size < SMALL_ROWS * int(blocks or n_sms)
    # One GPU places every gate_up and LM head unit at build time unless asked: which block
    # runs a grabbed gate_up unit varies run to run and so do the last bits of its block's part
    # of down, so only static units give greedy output that is the same bits every run
    # (SYNC.md). H100, 2026-12-07 (PERF.md), static against a 50-permille tail: Qwen3-1.7B
    # +0.79 %, Llama-3.1-8B +0.44 %, Llama-3.2-1B -0.35 %; the small shapes lose 17-22 % with a
    # 100-permille tail. Tensor parallel keeps it (its down is a GEMV over rows: the same bits either way).
    dyn = _knob(tuning, "KOG_DYN_PERMILLE")
    if "KOG_DYN_PERMILLE" not in tuning and world == 1:
        dyn = 0
    tuning["KOG_DYN_PERMILLE"] = dyn
    # o_proj items only on the blocks without an attention unit while the units are few
    # (o_proj.cuh): a small model's o_proj is latency-bound, a larger one's streams its rows
    # from every block (H100: SmolLM2 +0.6%, Qwen2.5-0.5B +1.8%, 1B -0.4%; PERF.md). Not
    # measured on AMD.
    spare = _flag(tuning, "KOG_OPROJ_SPARE", caller)
    if "KOG_OPROJ_SPARE" not in tuning and small and not arch:
        spare = 1
    tuning["KOG_OPROJ_SPARE"] = spare
    # GEMV loads per lane per tile (every GEMV of the build): capped at what a row of x needs
    # (a hidden-wide row: qkv, o_proj's and gate_up's input, the LM head). With 4 on
    # SmolLM2 (hidden 576: 3 loads a row) ptxas spills the tiles just loaded (32 STL, 3: 5) and
    # decode is 6% slower; Qwen2.5-0.5B (896: 4) and wider models keep 4, where 3 is 4-7% slower
    # (PERF.md). Fewer than 3 is not measured on a small model (2: -2 to -6% on 1B, 8B,
    # Qwen2.5). NVIDIA only (a 64-wide AMD wave keeps the default).
    if "KOG_GEMV_MAX_LOADS" not in tuning and not arch:
        row_loads = -(-lcfg.hidden_size // (8 * 32))
        tuning["KOG_GEMV_MAX_LOADS"] = min(_knob(tuning, "KOG_GEMV_MAX_LOADS"), max(3, row_loads))
    # one block per multiprocessor; a small model split over GPUs gets a smaller grid, so
    # that every block owns rows of every stage (placement.py)
    n_blocks = int(blocks or (n_sms if world == 1 else
                              max(1, min(n_sms, max_tp_blocks(lcfg, world, dyn)))))
    attn_chunk = int(tuning.get("KOG_ATTN_CHUNK", kernels.DEFAULT_TUNING.get(
        "KOG_ATTN_CHUNK", attn_chunk_cap(lcfg))))
    try:
        placement = place(lcfg, n_blocks, context_length, rank=rank, world_size=world,
                          max_chunk=attn_chunk,
                          min_chunk=_knob(tuning, "KOG_ATTN_MIN_CHUNK") or ATTN_MIN_CHUNK,
                          dyn_permille=dyn, threads=threads)
    except ValueError as e:
        raise DeviceError(f"cannot place this model on {n_blocks} blocks: {e}") from None
    if n_blocks > abi.SAMPLE_WS_MAX_BLOCKS:
        raise DeviceError(f"the sampler's workspace holds at most {abi.SAMPLE_WS_MAX_BLOCKS} blocks, "
                          f"not {n_blocks}")
    if world == 1 and n_blocks >= SUM_MAX_PARTS:
        # the next layer's input sum gets up to one part per block, counted in 10 bits (sync.cuh)
        raise DeviceError(f"one GPU runs at most {SUM_MAX_PARTS - 1} blocks (residual-sum part "
                          f"count), not {n_blocks}")
    # pairs of blocks sum their down partials in distributed shared memory (down.cuh): one GPU,
    # a GPU with clusters, an even grid, not a small model
    cluster, asked = _knob(tuning, "KOG_CLUSTER"), "KOG_CLUSTER" in tuning
    if cluster not in (1, 2):
        raise DeviceError(f"KOG_CLUSTER={cluster}{_from_env('KOG_CLUSTER', caller)}: 1 (single "
                          f"blocks) or 2 (pairs)")
    fits = world == 1 and not arch and clusters and n_blocks % cluster == 0
    if cluster > 1 and not fits and asked:
        raise DeviceError(f"KOG_CLUSTER={cluster}{_from_env('KOG_CLUSTER', caller)} needs one "
                          f"NVIDIA GPU of compute capability 9.0+ and a grid of whole "
                          f"clusters ({n_blocks} blocks)")
    if not fits or (small and not asked):
        cluster = 1
    tuning["KOG_CLUSTER"] = cluster
    # the in sums as copies (sync.cuh): single blocks on one NVIDIA GPU add a part per block to
    # every word of in(t, l + 1) at the end of down, a burst of adds to the same L2 lines that
    # the next qkv waits for; 2 copies halve each line's adds. H100: SmolLM2-135M +5%,
    # Qwen2.5-0.5B +4%; pairs (1B, Qwen3, 8B): 2 copies neutral, 4 -2 to -8% (PERF.md).
    copies = _knob(tuning, "KOG_IN_COPIES")
    if not 1 <= copies <= 8:
        raise DeviceError(f"KOG_IN_COPIES={copies}{_from_env('KOG_IN_COPIES', caller)}: 1 to 8 "
                          f"copies of each in sum")
    if "KOG_IN_COPIES" not in tuning and world == 1 and not arch and cluster == 1:
        copies = 2
    tuning["KOG_IN_COPIES"] = copies
    # the residual sums polled on their last pair first (gemv.cuh): while the parts land on a sum,
    # its readers re-read one line a copy instead of all. H100: Qwen2.5-0.5B +2.3 to +3.1%,
    # Qwen3-1.7B +1.7%, 1B +0.5%, 8B +0.3% (on the paired shapes the gain is the mid sum's);
    # SmolLM2-135M -1.2 to -2.3% while the attention blocks took o_proj items, +2.5 to +3.7%
    # since they take none (KOG_OPROJ_SPARE; PERF.md). Not measured on AMD; tensor parallel
    # builds read no residual sum.
    sentinel = _flag(tuning, "KOG_POLL_SENTINEL", caller)
    if "KOG_POLL_SENTINEL" not in tuning and world == 1 and not arch:
        sentinel = 1
    tuning["KOG_POLL_SENTINEL"] = sentinel
    # the next position's sums zeroed at o_proj's start instead of in gate_up's wait for the mid
    # sum (gemv.cuh). Measured while the zeroing fenced in every layer (the fence waited for the
    # gate_up rows just issued), H100, 3 rounds in each of 2-3 calls: SmolLM2-135M +4.3 to +4.6%
    # (hidden 576: 4.4 rows a block), Qwen2.5-0.5B -1.5 to -1.7% (6.8 rows), 1B -0.5 to -0.6%,
    # Qwen3 -0.7 to -0.9%, 8B -0.1 to -0.2%; with one fence a step, 3 rounds: SmolLM2 +1.5%,
    # Qwen2.5 -1.7% (PERF.md). The bound 5 lies between the measured 4.4 (on) and 6.8 (off);
    # SmolLM2 on 114-116 SMs (5.0 rows) is not measured and stays off. Not measured on AMD;
    # tensor parallel zeroes no sum.
    early = _flag(tuning, "KOG_ZERO_EARLY", caller)
    if "KOG_ZERO_EARLY" not in tuning and world == 1 and not arch and lcfg.hidden_size < 5 * n_blocks:
        early = 1
    tuning["KOG_ZERO_EARLY"] = early
    # the tiles a warp of gate_up issues before its wait for the mid sum (gemv.cuh): 2, or 1
    # (the second after the wait, so that the poll's loads queue behind one tile). On one GPU's
    # static default with down's depth 8 (H100, 2026-12-07, three interleaved rounds, PERF.md):
    # 1 on the small models whose warps get more than one gate_up unit (FFN columns > the
    # grid's warps): Qwen2.5-0.5B +1.75 % / +1.7 % on two cards (+0.95 % at position 2,000;
    # 2.3 units a warp), SmolLM2-135M -5.3 % (0.7 units a warp: its whole stage is those two
    # tiles); 2 everywhere else: on pairs 1 lost, Qwen3-1.7B -0.96 % (-0.78 % at 2,000),
    # Llama-3.2-1B -0.60 % (-0.29 %), Llama-3.1-8B -0.07 % (-0.12 %). (With a dynamic tail, before
    # the static default, 1 had won on Qwen3 +1.3 % and lost on Qwen2.5 -1.2 %.) The same on an
    # H200 (2026-12-07): 2 against 1 Qwen2.5 -1.34 %, Qwen3 +0.86 %, SmolLM2 +5.42 %. Not
    # measured on AMD (the rule is NVIDIA's only).
    gu_early = _flag(tuning, "KOG_GATE_UP_EARLY", caller, (1, 2), "1 or 2 tiles")
    many_units = small and not arch and lcfg.intermediate_size > n_blocks * (threads // 32)  # (Qwen2.5)
    if "KOG_GATE_UP_EARLY" not in tuning and many_units:
        gu_early = 1
    tuning["KOG_GATE_UP_EARLY"] = gu_early
    # the same for attn_norm_qkv's wait for the in sum: a block's read of the sum returns only
    # once the tiles it issued before it have drained (an H200 probe: 64 KB a block in flight,
    # Qwen3's, the read back 2.50 us after the burst began, its last tile 2.75; PERF.md). Three
    # interleaved rounds: H200 Qwen3-1.7B +0.9 %, 1B +0.5 %, 8B -0.2 %, SmolLM2-135M -1.4 %,
    # Qwen2.5-0.5B -0.3 %; H100 Qwen3 -0.5 % (at position 2,000 -0.5 %), 1B -0.2 % (-0.3 %).
    # So 1 on pairs up to hidden 2,048 on GPUs with an H200's memory (>= 100 GiB: HBM3e; an
    # H100's blocks end down over a wider spread, so more of their early tiles land before the
    # sum does). At position 2,000 on an H200 (2026-12-07) 1 holds too: 2 Qwen3 -0.73 %, 1B
    # -0.38 %. Not measured on other GPUs (H100 NVL, GH200, B200) or on AMD.
    qkv_early = _flag(tuning, "KOG_QKV_EARLY", caller, (1, 2), "1 or 2 tiles")
    mid_pairs = cluster > 1 and not small and lcfg.hidden_size <= 2048   # (Qwen3, 1B)
    if "KOG_QKV_EARLY" not in tuning and mid_pairs and memory_gib >= H200_CLASS_GIB:
        qkv_early = 1
    tuning["KOG_QKV_EARLY"] = qkv_early
    if n_blocks < lcfg.n_kv_heads:
        # tensor parallel: the unit combining a head's partials must be the last unit of its
        # block (one GPU's o_proj items merge them; it has not run below this either)
        raise DeviceError(f"the attention combine needs at least {lcfg.n_kv_heads} blocks (kv heads)")
    scratch = 2 * threads // 32 + 16                 # sync.cuh KOG_SCRATCH_FLOATS
    x_full = lcfg.hidden_size if world > 1 else 0    # tensor parallel: x per block
    tile, bufs = (int(tuning.get(k, kernels.DEFAULT_TUNING.get(k, v))) for k, v in
                  zip(("KOG_ATTN_TILE", "KOG_ATTN_BUFS"), attn_tiling(lcfg, arch)))
    if arch and "KOG_ATTN_BUFS" not in tuning:
        bufs = 1             # HIP: kog_copy16 is a synchronous copy, a second buffer overlaps nothing
    depth = _flag(tuning, "KOG_DOWN_DEPTH", caller, range(1, 17),
                  "1 to 16 rows of w_down a thread stages")
    if arch and "KOG_DOWN_DEPTH" not in tuning:
        depth = 1            # (the same for down_residual's row staging)
    # rows of w_down a thread keeps in flight: 8 (kernels.py). 12 on pairs up to hidden 2,048
    # won +0.5 % on Qwen3-1.7B while those builds had a dynamic tail; with every unit static
    # (one GPU since 2026-12-07), H100, three interleaved rounds, 8 against 12: Qwen3 +0.53 %
    # (+0.58 % at position 2,000), 1B +0.62 % (+0.33 %); 16: Qwen3 -1.5 %, 1B -0.7 % (PERF.md).
    tuning["KOG_DOWN_DEPTH"] = depth

    warp = wave_size(arch)

    def smem_bytes(tile, bufs):
        return 4 * (smem_floats(lcfg, tile, bufs, threads, warp, placement.ffn_slots, depth, arch,
                                n_blocks) + scratch + 16
                    + x_full)
    if smem_limit and "KOG_ATTN_TILE" not in tuning:
        while (smem_bytes(tile, bufs) > smem_limit and
               attn_tile_problem(lcfg, tile // 2, bufs, threads, warp, arch, world) is None):
            tile //= 2       # e.g. 64 KB a block (AMD): Llama-3.2-1B 64-position tiles
    problem = attn_tile_problem(lcfg, tile, bufs, threads, warp, arch, world)
    if problem:
        raise DeviceError(f"KOG_ATTN_TILE={tile}, KOG_ATTN_BUFS={bufs}: {problem}")
    if smem_limit and 4 * (-(-sample_smem_floats(lcfg, n_blocks) // 4) * 4 + scratch + 16 + x_full) > smem_limit:
        raise DeviceError(f"the sampler's slice of the vocabulary ({lcfg.vocab_size} ids over "
                          f"{n_blocks} blocks: {sample_slice(lcfg, n_blocks)} a block) does not fit "
                          f"in {smem_limit} B of shared memory a block: run more blocks")
    tuning["KOG_ATTN_TILE"], tuning["KOG_ATTN_BUFS"] = tile, bufs
    tuning["KOG_FFN_SLOTS"] = placement.ffn_slots    # (the placement's, not a knob)
    tuning["KOG_SAMPLE_SLICE"] = sample_slice(lcfg, n_blocks)   # (the grid's)
    return BuildPlan(n_blocks=n_blocks, tuning=tuning, placement=placement,
                     attn_chunk=attn_chunk,
                     smem_floats=smem_floats(lcfg, tile, bufs, threads, warp, placement.ffn_slots, depth, arch,
                                             n_blocks),
                     smem_bytes=smem_bytes(tile, bufs))
