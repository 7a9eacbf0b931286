// ============================================================================================
// gemv.cuh -- batch-1 matrix-vector streaming, and the GEMV stages built on it:
//   o_proj_residual, ffn_norm_gate_up_silu, down_residual, final_norm_lm_head
// (attn_norm_qkv is in norm_rope.cuh).
//
// A block owns a contiguous range of "units" (UNIT consecutive rows: 1 for plain rows, 2 for
// an interleaved gate/up pair) of a row-major matrix; Python balanced the ranges at build time
// (placement.py). Warp w streams units begin + w, begin + w + n_warps, ... in tiles of NLT
// 16-byte non-temporal loads per lane, coalesced across the warp, double-buffered in registers
// so the next tile is in flight while the current one is consumed.
//
// The weight stream does not stop at stage boundaries: the first tile is loaded BEFORE the
// block waits for its input (weights never depend on activations); `ready()` then waits,
// loads the activation vector into shared memory once (and its RMS when the stage normalises),
// and returns the scale the dot products are multiplied by.
// ============================================================================================
#pragma once
#include "platform.cuh"
#include "sync.cuh"

// Knobs (kernels.py DEFAULT_TUNING / build_plan.py pass every one): KOG_GEMV_MAX_LOADS 16-byte
// loads per lane per tile, KOG_DYN_PERMILLE the share of gate_up / lm_head units handed out at
// run time, KOG_DOWN_DEPTH rows a thread of down_residual keeps in flight.
#if !defined(KOG_GEMV_MAX_LOADS) || !defined(KOG_DYN_PERMILLE) || !defined(KOG_DOWN_DEPTH)
#error "GEMV knobs come from kernels.py (model_defines)"
#endif

// Waits until every word of the tagged vector src[0:N) carries `tag` (SUM: every residual-sum
// word has `tag` parts, sync.cuh), then puts the values in shared xs. Every thread issues
// all its 16-byte loads before the first check (one L2 round trip when the data is there) and
// re-polls only what was not ready. Returns 1/rms(src) when `norm`, else 1. All threads call
// it; it ends with a block barrier.
template <bool SUM>
KOG_DEVICE bool kog_word_ready(kog_u64 w, kog_u32 tag) { return SUM ? kog_sum_ready(w, tag) : kog_tag_of(w) == tag; }
template <bool SUM>
KOG_DEVICE float kog_word_value(kog_u64 w) { return SUM ? kog_sum_value(w) : kog_value_of(w); }
template <int N, bool SUM = false>
KOG_DEVICE float kog_load_activation(const kog_u64* src, kog_u32 tag, float* xs, float* scratch,
                                     bool norm) {
    static_assert(N % 2 == 0, "tagged vectors are read in pairs");
    constexpr int P2 = N / 2;
    constexpr int PER = (P2 + KOG_THREADS - 1) / KOG_THREADS;
    const kog_u64 done = SUM ? (kog_u64)tag : (kog_u64)tag << 32;   // a ready word
    kog_u64 w[PER][2];
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int i = threadIdx.x + k * KOG_THREADS;
        w[k][0] = w[k][1] = done;
        if (P2 % KOG_THREADS == 0 || i < P2) kog_ld_tagged2(src + 2 * i, w[k][0], w[k][1]);
    }
    for (;;) {
        bool ready = true;
#pragma unroll
        for (int k = 0; k < PER; ++k) {
            const int i = threadIdx.x + k * KOG_THREADS;
            if (!kog_word_ready<SUM>(w[k][0], tag) || !kog_word_ready<SUM>(w[k][1], tag)) {
                ready = false;
                kog_ld_tagged2(src + 2 * i, w[k][0], w[k][1]);
            }
        }
        if (ready) break;
    }
    __syncthreads();                              // xs is free: the previous stage is done with it
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int i = threadIdx.x + k * KOG_THREADS;
        if (P2 % KOG_THREADS == 0 || i < P2) {
            const float a = kog_word_value<SUM>(w[k][0]), b = kog_word_value<SUM>(w[k][1]);
            xs[2 * i] = a;
            xs[2 * i + 1] = b;
            ss = fmaf(a, a, fmaf(b, b, ss));
        }
    }
    if (norm) {
        ss = kog_block_sum(ss, scratch);          // its barriers also publish xs
        return rsqrtf(ss / (float)N + KOG_EPS);
    }
    __syncthreads();
    return 1.f;
}

// Streams units [u_begin, u_end) of W (units of UNIT rows x K weights, row-major).
//   ready()                -> float scale (<= 0: abort, the generation is over)
//   epi(unit, acc[UNIT], scale)   called by every lane of the owning warp after the warp sum
// Tile geometry of a GEMV over rows of K weights in units of UNIT rows.
template <int K, int UNIT>
struct KogGemvShape {
    static constexpr int CPR = K / 8;                                   // 16-byte chunks per row
    static constexpr int CPU = UNIT * CPR;                              // chunks per unit
    static constexpr int WANT = (CPU + KOG_WARP - 1) / KOG_WARP;
    static constexpr int NLT = WANT < KOG_GEMV_MAX_LOADS ? WANT : KOG_GEMV_MAX_LOADS;
    static constexpr int TILE = KOG_WARP * NLT;                         // chunks per warp tile
    static constexpr int TPU = (CPU + TILE - 1) / TILE;                 // tiles per unit
    static constexpr int PER_UNIT = TPU * NLT;                          // loads per lane per unit
    static constexpr int GRAB = TPU >= 4 ? 1 : 4 / TPU;                 // dynamic units per grab
};

// Optional dynamic tail (DYN): after its static units, each warp grabs units [dyn_begin,
// dyn_end) GRAB at a time from a monotone counter (`cursor`, value `base` at this stage's start;
// every warp ends with exactly one failed grab, so the next position's base is known). It
// evens out multiprocessors that get less bandwidth than others.
struct KogDynamic {
    kog_u32* cursor;
    kog_u32 base;
    int begin, end;
};
// LD: the distance between rows in weights (a block of columns of a wider matrix: o_proj's
// head-group slices); K when the rows are whole.
template <int K, int UNIT, bool DYN = false, int LD = K, class Ready, class Epilogue>
KOG_DEVICE void kog_gemv(const kog_u16* W, int u_begin, int u_end, const float* xs, const KogCtx& ctx,
                         Ready ready, Epilogue epi, KogDynamic dyn = KogDynamic{}) {
    static_assert(K % 8 == 0 && LD % 8 == 0, "rows must be a whole number of 16-byte vectors");
    static_assert(LD == K || !DYN, "a dynamic tail streams whole rows");
    constexpr int CPR = K / 8;                                   // 16-byte chunks per row
    // A slice of wider rows (LD != K): each row padded to whole warp loads (lanes past its end
    // idle), so that a load's row and column need no division by the lane's chunk index.
    constexpr bool SLICE = LD != K;
    constexpr int CPRP = SLICE ? (CPR + KOG_WARP - 1) / KOG_WARP * KOG_WARP : CPR;
    constexpr int CPU = UNIT * CPRP;                             // chunks per unit
    constexpr int WANT = (CPU + KOG_WARP - 1) / KOG_WARP;
    constexpr int NLT = WANT < KOG_GEMV_MAX_LOADS ? WANT : KOG_GEMV_MAX_LOADS;
    constexpr int TILE = KOG_WARP * NLT;                         // chunks per warp tile
    constexpr int TPU = (CPU + TILE - 1) / TILE;                 // tiles per unit
    constexpr bool FULL = (CPU % TILE) == 0;                     // no ragged last tile

    const int lane = threadIdx.x % KOG_WARP;
    const int warp = threadIdx.x / KOG_WARP;
    const int n_warps = blockDim.x / KOG_WARP;
    const kog_vec4* W4 = reinterpret_cast<const kog_vec4*>(W);
    const int first = u_begin + warp;
    const int n_units = first < u_end ? (u_end - first + n_warps - 1) / n_warps : 0;
    int n_tiles = n_units * TPU;

    // Two tiles in flight per warp (cur, nxt), both issued before the wait for the input (one
    // or none issued early measured 6% / 3% slower on Llama-3.2-1B: kernels_src/PERF.md).
    kog_vec4 cur[NLT], nxt[NLT];
    auto load = [&](int i, kog_vec4 (&v)[NLT]) {
        const int u = first + (i / TPU) * n_warps;
        const int kt = i % TPU;
        if constexpr (LD == K) {
            const kog_vec4* base = W4 + (kog_u64)u * CPU + kt * TILE + lane;
#pragma unroll
            for (int j = 0; j < NLT; ++j)
                if (FULL || kt * TILE + j * KOG_WARP + lane < CPU) v[j] = kog_ld_stream(base + j * KOG_WARP);
        } else {
            constexpr int WPR = CPRP / KOG_WARP;                       // warp loads per row
#pragma unroll
            for (int j = 0; j < NLT; ++j) {
                const int q = kt * NLT + j;                            // warp load of the unit
                const int col = (q % WPR) * KOG_WARP + lane;
                if ((FULL || q * KOG_WARP < CPU) && col < CPR)
                    v[j] = kog_ld_stream(W4 + ((kog_u64)u * UNIT + q / WPR) * (LD / 8) + col);
            }
        }
    };
    if (n_tiles > 0) load(0, cur);
    if (n_tiles > 1) load(1, nxt);

    const float scale = ready();
    if (!(scale > 0.f)) return;

    const float4* x4 = reinterpret_cast<const float4*>(xs);
    float acc[UNIT];
#pragma unroll
    for (int r = 0; r < UNIT; ++r) acc[r] = 0.f;
    // The one tile dot product: tile kt of a unit (its NLT loads v) into acc; after the unit's
    // last tile, the warp sum goes to the epilogue of unit u.
    auto dot_tile = [&](int kt, const kog_vec4 (&v)[NLT], int u) {
#pragma unroll
        for (int j = 0; j < NLT; ++j) {
            const int c = kt * TILE + j * KOG_WARP + lane;
            const int row = c / CPRP;
            const int col = c - row * CPRP;
            if ((FULL || c < CPU) && (!SLICE || col < CPR)) {
                const float4 a = x4[2 * col], b = x4[2 * col + 1];
                const float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
                for (int r = 0; r < UNIT; ++r)
                    if (UNIT == 1 || row == r) acc[r] = kog_dot8(v[j], xv, acc[r]);
            }
        }
        if (kt == TPU - 1) {
#pragma unroll
            for (int r = 0; r < UNIT; ++r) acc[r] = kog_warp_sum(acc[r]);
            epi(u, acc, scale);
#pragma unroll
            for (int r = 0; r < UNIT; ++r) acc[r] = 0.f;
        }
    };
    auto consume = [&](int i, const kog_vec4 (&v)[NLT]) {
        dot_tile(i % TPU, v, first + (i / TPU) * n_warps);
    };
    // Unrolled by two so the buffers swap roles without register moves (a move of a pending
    // load would stall until it lands, leaving one tile in flight instead of two).
    for (int i = 0; i < n_tiles; i += 2) {
        consume(i, cur);
        if (i + 2 < n_tiles) load(i + 2, cur);
        if (i + 1 < n_tiles) {
            consume(i + 1, nxt);
            if (i + 3 < n_tiles) load(i + 3, nxt);
        }
    }
    if constexpr (DYN) {
        constexpr int GRAB = KogGemvShape<K, UNIT>::GRAB;
        constexpr int NT = GRAB * TPU;                          // tiles per grab
        const int n_grabs = (dyn.end - dyn.begin + GRAB - 1) / GRAB;
        kog_vec4 da[NLT], db[NLT];
        for (;;) {
            int v = 0;
            if (lane == 0) v = (int)(atomicAdd(dyn.cursor, 1u) - dyn.base);
            v = kog_shfl_int(v, 0);
            if (v >= n_grabs) break;
            const int u0 = dyn.begin + v * GRAB;
            auto dload = [&](int i, kog_vec4 (&d)[NLT]) {
                const int u = u0 + i / TPU, kt = i % TPU;
                if (u < dyn.end) {
#pragma unroll
                    for (int j = 0; j < NLT; ++j)
                        if (FULL || kt * TILE + j * KOG_WARP + lane < CPU)
                            d[j] = kog_ld_stream(W4 + (kog_u64)u * CPU + kt * TILE + j * KOG_WARP + lane);
                }
            };
            auto dconsume = [&](int i, const kog_vec4 (&d)[NLT]) {
                const int u = u0 + i / TPU;
                if (u < dyn.end) dot_tile(i % TPU, d, u);
            };
            dload(0, da);
            if (NT > 1) dload(1, db);
            for (int i = 0; i < NT; i += 2) {
                dconsume(i, da);
                if (i + 2 < NT) dload(i + 2, da);
                if (i + 1 < NT) {
                    dconsume(i + 1, db);
                    if (i + 3 < NT) dload(i + 3, db);
                }
            }
        }
    }
}

// The dynamic-tail cursor of a stage at position index `index` (see KogDynamic).
template <int K, int UNIT>
KOG_DEVICE KogDynamic kog_dynamic(const KogCtx& c, int counter, int index, int begin, int end) {
    constexpr int GRAB = KogGemvShape<K, UNIT>::GRAB;
    const kog_u32 per_index = (kog_u32)((end - begin + GRAB - 1) / GRAB)
                            + gridDim.x * (blockDim.x / KOG_WARP);    // + one failed grab per warp
    return KogDynamic{kog_counter(c, counter), (kog_u32)index * per_index, begin, end};
}

// ============================================================================================
// Tensor parallel (KOG_TP ranks, kccl.cuh): o_proj and down give each rank a PARTIAL of every
// row of x (its heads' / its FFN columns' share). The warp finishing row i stores its partial
// into xpart[slot][rank][i] of EVERY rank (slot 0: o_proj, 1: down). There is no owner that
// sums and republishes: every block of every rank keeps the whole residual stream x in its
// shared memory (x_full) and, in the stage that reads x next, polls all ranks' partials and
// adds them in rank order -- the same bits everywhere, and one hop instead of two.
// Every block must own rows of every GEMV stage (placement.py checks) so that its reads of a
// slot come before the writes of the slot's next version (SYNC.md, "Tensor parallel").
// ============================================================================================
#if KOG_TP > 1
KOG_DEVICE void kog_tp_put_partial(const KogCtx& c, int slot, int row, float v, kog_u32 tag) {
    kccl_put_tagged(c.p->tp_peers + KOG_PEER_XPART * KCCL_MAX_RANKS, KOG_TP,
                    ((kog_u64)slot * KOG_TP + c.p->tp_rank) * KOG_HIDDEN + row, v, tag);
}

// x_full += sum over ranks (rank order) of slot's partials carrying `tag`; returns 1/rms(x).
// All threads call it; it ends with a block barrier (x_full is then the stage's input).
KOG_DEVICE float kog_tp_load_reduced(const KogCtx& c, int slot, kog_u32 tag) {
    constexpr int P2 = KOG_HIDDEN / 2;
    constexpr int PER = (P2 + KOG_THREADS - 1) / KOG_THREADS;
    const kog_u64* part = c.p->xpart + (kog_u64)slot * KOG_TP * KOG_HIDDEN;
    kog_u64 w[PER][KOG_TP][2];
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int i = threadIdx.x + k * KOG_THREADS;
#pragma unroll
        for (int q = 0; q < KOG_TP; ++q) {
            w[k][q][0] = w[k][q][1] = 0ull;
            if (P2 % KOG_THREADS == 0 || i < P2)
                kog_ld_tagged2_system(part + (kog_u64)q * KOG_HIDDEN + 2 * i, w[k][q][0], w[k][q][1]);
        }
    }
    kog_u64 t0 = 0;
    for (unsigned spins = 0;; ++spins) {
        bool ready = true;
#pragma unroll
        for (int k = 0; k < PER; ++k) {
            const int i = threadIdx.x + k * KOG_THREADS;
#pragma unroll
            for (int q = 0; q < KOG_TP; ++q)
                if ((P2 % KOG_THREADS == 0 || i < P2) &&
                    (kog_tag_of(w[k][q][0]) != tag || kog_tag_of(w[k][q][1]) != tag)) {
                    ready = false;
                    kog_ld_tagged2_system(part + (kog_u64)q * KOG_HIDDEN + 2 * i, w[k][q][0], w[k][q][1]);
                }
        }
        if (ready) break;
        if ((spins & 1023u) == 0u) {                 // a peer that stopped: fail, never hang
            if (spins == 0u) t0 = kog_globaltimer();
            else if (kog_globaltimer() - t0 > KCCL_TIMEOUT_NS) kog_trap();
        }
    }
    __syncthreads();                                 // the previous stage is done with x_full
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int i = threadIdx.x + k * KOG_THREADS;
        if (P2 % KOG_THREADS == 0 || i < P2) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float s = 0.f;
#pragma unroll
                for (int q = 0; q < KOG_TP; ++q) s += kog_value_of(w[k][q][h]);
                const float v = c.x_full[2 * i + h] + s;
                c.x_full[2 * i + h] = v;
                ss = fmaf(v, v, ss);
            }
        }
    }
    ss = kog_block_sum(ss, c.scratch);               // its barriers also publish x_full
    return rsqrtf(ss / (float)KOG_HIDDEN + KOG_EPS);
}
#endif


#if KOG_TP == 1
// Called by ffn_norm_gate_up_silu(t, l) before its wait for mid(t, l) (the fence overlaps that
// wait): zero this block's share of in(t + 1, l) and mid(t + 1, l) (and, at the last layer,
// of in(t + 1, L)), which share their buffers with position t - 1's sums (sync.cuh).
// After every read of t - 1's: this block passed its wait on in(t, l) in attn_norm_qkv(t, l);
// for l > 0 that sum holds every block's down_residual(t, l - 1) (alone or in its pair's part,
// added after the pair's cluster barrier), so every block is
// past its qkv(t, l - 1) and gate_up(t, l - 1) -- later than its reads of in(t - 1, l),
// mid(t - 1, l) (and the LM head's or the sampler's of in(t - 1, L)); for l = 0 in(t, 0) is
// the embedding of t, written by the sampler of t - 1 after every LM-head block's release
// (each past its wait on in(t - 1, L), which holds every block's last down) or, inside the
// prompt, after its own wait on in(t - 1, L): the same chain. Before every part of t + 1's:
// a part of in(t + 1, l), l > 0, comes from a block past its wait on mid(t + 1, l - 1), whose
// words of this block's rows hold the part this block adds in attn_norm_qkv(t + 1, l - 1) -- a
// later write of this block, after the fence (a block with no rows zeroes nothing); the
// embedding in in(t + 1, 0) and every part of mid(t + 1, 0) follow the sampler of t, past
// every block's last down of t; parts of mid(t + 1, l) follow the wait on in(t + 1, l).
// Relaxed atomic stores, as every other access to the sums.
KOG_DEVICE void kog_xsum_zero_next(const KogCtx& c, int layer) {
    const int z0 = kog_share_begin(), z1 = kog_share_end();
    if (z0 + (int)threadIdx.x < z1) {
        kog_u64* in = kog_xsum_in(c.p, c.t + 1, layer);
        kog_u64* mid = kog_xsum_mid(c.p, c.t + 1, layer);
        kog_u64* last = kog_xsum_in(c.p, c.t + 1, KOG_N_LAYERS);
        for (int i = z0 + threadIdx.x; i < z1; i += blockDim.x) {
            kog_st_relaxed_u64(in + i, 0ull);
            kog_st_relaxed_u64(mid + i, 0ull);
            if (layer == KOG_N_LAYERS - 1) kog_st_relaxed_u64(last + i, 0ull);
        }
        kog_fence_gpu();
    }
}
// Shared memory of the FFN (one GPU): x (KOG_HIDDEN floats) from gate_up's wait to the end of
// down_residual; the row groups' partials of down; this block's activations (KOG_FFN_SLOTS:
// static units at their offset, grabbed ones after them) and the unit of each grabbed slot
// (ints); down_residual's row staging (KOG_DOWN_DEPTH rows a thread in flight).
#ifndef KOG_FFN_SLOTS
#define KOG_FFN_SLOTS KOG_FFN     // units a block runs at most (host: static + dynamic tail)
#endif
#define KOG_FFN_CH (KOG_HIDDEN / 8)                                     // 16-byte chunks a row
#define KOG_FFN_GROUPS (KOG_FFN_CH >= KOG_THREADS ? 1 : KOG_THREADS / KOG_FFN_CH)
#define KOG_FFN_RED_OFF KOG_HIDDEN
#define KOG_FFN_ACT_OFF (KOG_FFN_RED_OFF + KOG_FFN_GROUPS * KOG_HIDDEN)
#define KOG_FFN_STAGE_OFF ((KOG_FFN_ACT_OFF + 2 * KOG_FFN_SLOTS + 3) / 4 * 4)
#define KOG_FFN_SMEM_FLOATS (KOG_FFN_STAGE_OFF + \
    KOG_DOWN_DEPTH * 4 * KOG_THREADS * ((KOG_FFN_CH + KOG_THREADS - 1) / KOG_THREADS))
#define KOG_SLOT_FFN_GRABBED (KOG_SLOT_FLAG + 2)                        // scratch: grabbed units
#endif

// ============================================================================================
// Stage o_proj_residual: x += wo @ attn_out.
// One GPU: split over the kv head groups (o_proj's reduction over q_dim). Item (g, s) waits only
// for head group g's attention output (the G * HD words its combiner wrote), multiplies it by
// columns [g * G * HD, (g + 1) * G * HD) of row slice s of wo and adds the products into the
// residual sum mid(t, l) (sync.cuh), where attn_norm_qkv has added the x entering the layer.
// Items spread over the blocks from block 0 up; attention units go from the top of the grid
// down, and an item waits only for a combiner, which never waits for an item.
// Tensor parallel: every rank's heads give a partial of every row, all-reduced (kccl.cuh).
// ============================================================================================
KOG_DEVICE void kog_stage_o_proj_residual(const KogCtx& c, int layer) {
    kog_prof(c, layer * 16 + 6 + 0);
    const KogParams* p = c.p;
    const kog_u32 attn_tag = kog_tag(c.t, layer, KOG_STAGE_ATTN);
#if KOG_TP > 1
    const int r0 = c.part[2], r1 = c.part[3];
    const kog_u32 x_out = kog_tag(c.t, layer, KOG_STAGE_O);
    auto ready = [&]() -> float {
        if (r0 >= r1) return -1.f;
        const float s = kog_load_activation<KOG_Q_DIM>(p->attn_out, attn_tag, c.smem, c.scratch, false);
        kog_prof(c, layer * 16 + 7);
        return s;
    };
    auto epi = [&](int row, float (&acc)[1], float) {
        if (threadIdx.x % KOG_WARP == 0) kog_tp_put_partial(c, 0, row, acc[0], x_out);
    };
    kog_gemv<KOG_Q_DIM, 1>(p->wo + (kog_u64)layer * KOG_HIDDEN * KOG_Q_DIM, r0, r1, c.smem, c, ready, epi);
#else
    constexpr int GHD = KOG_GQA * KOG_HEAD_DIM;     // columns of one head group
    constexpr int RU = 4;                           // rows per GEMV unit (a warp tile spans them)
    constexpr int NU = KOG_HIDDEN / RU;
    static_assert(KOG_HIDDEN % RU == 0, "o_proj: whole units of rows");
    const int n_slices = max(1, (int)gridDim.x / KOG_N_KV);
    kog_u64* sum = kog_xsum_mid(p, c.t, layer);
    for (int item = blockIdx.x; item < KOG_N_KV * n_slices; item += gridDim.x) {
        const int g = item % KOG_N_KV, sl = item / KOG_N_KV;
        const int u0 = (int)((long long)sl * NU / n_slices), u1 = (int)((long long)(sl + 1) * NU / n_slices);
        auto ready = [&]() -> float {
            if (u0 >= u1) return -1.f;
            const float s = kog_load_activation<GHD>(p->attn_out + g * GHD, attn_tag, c.smem, c.scratch, false);
            kog_prof(c, layer * 16 + 7);
            return s;
        };
        auto epi = [&](int u, float (&acc)[RU], float) {
            const int lane = threadIdx.x % KOG_WARP;
            float v = acc[0];
#pragma unroll
            for (int r = 1; r < RU; ++r) if (lane == r) v = acc[r];
            if (lane < RU) kog_red_add_u64(sum + u * RU + lane, kog_sum_word(p, v));
        };
        kog_gemv<GHD, RU, false, KOG_Q_DIM>(p->wo + (kog_u64)layer * KOG_HIDDEN * KOG_Q_DIM + g * GHD,
                                           u0, u1, c.smem, c, ready, epi);
    }
#endif
    kog_prof_end(c, layer * 16 + 6 + 2);
}

// ============================================================================================
// Stage ffn_norm_gate_up_silu: act[j] = silu(gate_j . n) * (up_j . n), n = rmsnorm(x).
// Gate and up rows are interleaved (unit j = rows 2j, 2j+1), so one warp finishes act[j].
// One GPU: x is mid(t, l); act stays in this block's shared memory for its own
// down_residual (no other block reads it). Tensor parallel: act is a tagged vector.
// ============================================================================================
KOG_DEVICE void kog_stage_ffn_norm_gate_up_silu(const KogCtx& c, int layer) {
    kog_prof(c, layer * 16 + 9 + 0);
    const KogParams* p = c.p;
    const int u0 = c.part[4], u1 = c.part[5];
    float* dbg = kog_debug_row(c);
    constexpr bool DYN = KOG_DYN_PERMILLE > 0;
#if KOG_TP == 1
    float* acts = c.smem + KOG_FFN_ACT_OFF;
    int* grabbed_unit = reinterpret_cast<int*>(acts + KOG_FFN_SLOTS);
    int* n_grabbed = reinterpret_cast<int*>(c.scratch + KOG_SLOT_FFN_GRABBED);
#endif
    auto ready = [&]() -> float {
#if KOG_TP > 1
        const float s = kog_tp_load_reduced(c, 0, kog_tag(c.t, layer, KOG_STAGE_O));
#else
        kog_xsum_zero_next(c, layer);     // (its fence overlaps the wait)
        if (threadIdx.x == 0) *n_grabbed = 0;                // (the wait's barriers publish it)
        // every block reads x: down_residual adds its share's rows to in(t, l + 1)
        const float s = kog_load_activation<KOG_HIDDEN, true>(kog_xsum_mid(p, c.t, layer), KOG_MID_PARTS,
                                                              c.smem, c.scratch, true);
        if (dbg != nullptr)
            for (int i = kog_share_begin() + threadIdx.x; i < kog_share_end(); i += blockDim.x)
                dbg[KOG_DBG_O_PROJ + (kog_u64)layer * KOG_DBG_LAYER + i] = c.smem[i];
        if (!DYN && u0 >= u1) return -1.f;
#endif
        kog_prof(c, layer * 16 + 10);
        return s;
    };
    const kog_u32 tag = kog_tag(c.t, layer, KOG_STAGE_GATE_UP);
    auto epi = [&](int j, float (&acc)[2], float scale) {
        if (threadIdx.x % KOG_WARP == 0) {
            const float g = acc[0] * scale, u = acc[1] * scale;
            const float a = g / (1.f + expf(-g)) * u;
#if KOG_TP > 1
            kog_st_tagged(p->act + j, a, tag);
#else
            int slot = j - u0;                               // a static unit
            if (j >= u1) {                                   // a grabbed one (dynamic tail)
                slot = (u1 - u0) + atomicAdd(n_grabbed, 1);
                grabbed_unit[slot] = j;
            }
            acts[slot] = a;
#endif
            if (dbg != nullptr) dbg[KOG_DBG_GATE_UP + (kog_u64)layer * KOG_DBG_LAYER + j] = a;
        }
    };
    kog_gemv<KOG_HIDDEN, 2, DYN>(p->w_gate_up + (kog_u64)layer * 2 * KOG_FFN * KOG_HIDDEN, u0, u1,
                                 KOG_TP > 1 ? c.x_full : c.smem, c, ready, epi,
                                 kog_dynamic<KOG_HIDDEN, 2>(c, KOG_CNT_DYN + layer, c.t - p->start_pos,
                                                            p->gate_up_dyn_begin, KOG_FFN));
    kog_prof_end(c, layer * 16 + 9 + 2);
}

// ============================================================================================
// Stage down_residual: x += w_down @ act.
// One GPU: no wait. A block multiplies the activations of the FFN units it ran (its own
// shared memory) by those units' columns of w_down -- stored transposed, (L, FFN, HIDDEN): a
// unit's column is one contiguous row -- which gives its partial of EVERY row of x, and adds
// it into in(t, l + 1) (one part per cluster of KOG_CLUSTER blocks, summed in distributed
// shared memory; for the rows of each block's share plus x after o_proj).
// Thread layout: a thread owns 16-byte chunk `ch` of a row (8 outputs) in row group `grp`;
// the groups split the units and are summed in shared memory at the end.
// Tensor parallel: rows of x, each rank's partial of every row to every rank (kccl.cuh).
// ============================================================================================
#if KOG_TP == 1
// The block's part of in(t, l + 1) from its n activations (slots [0, n_static): units u0 + slot;
// then the grabbed units). A thread streams its chunk of its units' rows through its own
// KOG_DOWN_DEPTH slots of shared memory (cp.async: no registers hold loads in flight, and a
// thread reads back only what it copied, so no barrier); KOG_DOWN_DEPTH - 1 rows in flight.
KOG_DEVICE void kog_down_parts(const KogParams* p, int layer, int t, int u0, int n_static, int n) {
    constexpr int CH = KOG_FFN_CH, G = KOG_FFN_GROUPS, D = KOG_DOWN_DEPTH;
    constexpr int CPT = (CH + KOG_THREADS - 1) / KOG_THREADS;          // chunks a thread
    float* smem = kog_smem();
    const float* xs = smem;
    const float* acts = smem + KOG_FFN_ACT_OFF;
    const int* grabbed_unit = reinterpret_cast<const int*>(acts + KOG_FFN_SLOTS);
    kog_vec4* stage = reinterpret_cast<kog_vec4*>(smem + KOG_FFN_STAGE_OFF);   // [D][CPT][threads]
    const int grp = G > 1 ? (int)threadIdx.x / CH : 0;
    const int ch = G > 1 ? (int)threadIdx.x % CH : (int)threadIdx.x;
    const kog_vec4* W = reinterpret_cast<const kog_vec4*>(p->w_down) + (kog_u64)layer * KOG_FFN * CH;
    const int mine = grp < G ? (n - grp + G - 1) / G : 0;               // slots grp, grp + G, ...
    auto issue = [&](int i) {                         // row of this thread's i-th unit -> slot i % D
        if (i < mine) {
            const int slot = grp + i * G;
            const int unit = slot < n_static ? u0 + slot : grabbed_unit[slot];
#pragma unroll
            for (int k = 0; k < CPT; ++k)
                if (CH % KOG_THREADS == 0 || ch + k * KOG_THREADS < CH)
                    kog_copy16(stage + ((i % D) * CPT + k) * KOG_THREADS + threadIdx.x,
                               W + (kog_u64)unit * CH + ch + k * KOG_THREADS);
        }
        kog_copy16_commit();                          // one group per row, empty ones too
    };
    float acc[CPT][8];
#pragma unroll
    for (int k = 0; k < CPT; ++k)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[k][e] = 0.f;
#pragma unroll
    for (int i = 0; i < D - 1; ++i) issue(i);
    for (int i = 0; i < mine; ++i) {
        issue(i + D - 1);
        kog_copy16_wait_groups<D - 1>();              // row i is in
        const float a = acts[grp + i * G];
#pragma unroll
        for (int k = 0; k < CPT; ++k)
            if (CH % KOG_THREADS == 0 || ch + k * KOG_THREADS < CH)
                kog_axpy8(stage[((i % D) * CPT + k) * KOG_THREADS + threadIdx.x], a, acc[k]);
    }
    kog_copy16_wait_groups<0>();
    // the block's part of in(t, l + 1): its partial of every row, plus x for its share's rows
    kog_u64* out = kog_xsum_in(p, t, layer + 1);
    const int z0 = kog_share_begin(), z1 = kog_share_end();
    // through shared memory: the groups' partials summed, and coalesced adds (a warp's 32
    // consecutive words; from registers a lane's 8 words would spread a warp's adds over 2 KB)
    float* red = smem + KOG_FFN_RED_OFF;
    if (grp < G)
#pragma unroll
        for (int k = 0; k < CPT; ++k)
            if (CH % KOG_THREADS == 0 || ch + k * KOG_THREADS < CH) {
                float4* r4 = reinterpret_cast<float4*>(red + grp * KOG_HIDDEN + (ch + k * KOG_THREADS) * 8);
                r4[0] = make_float4(acc[k][0], acc[k][1], acc[k][2], acc[k][3]);
                r4[1] = make_float4(acc[k][4], acc[k][5], acc[k][6], acc[k][7]);
            }
    __syncthreads();
    for (int i = threadIdx.x; i < KOG_HIDDEN; i += blockDim.x) {
        float v = (i >= z0 && i < z1) ? xs[i] : 0.f;
#pragma unroll
        for (int g = 0; g < G; ++g) v += red[g * KOG_HIDDEN + i];
#if KOG_CLUSTER == 1
        kog_red_add_u64(out + i, kog_sum_word(p, v));
#else
        red[i] = v;                                   // the pair adds it (below)
#endif
    }
#if KOG_CLUSTER > 1
    // a pair of blocks (one cluster): each has summed its own partial into red[0, H); each
    // adds half of the rows for both -- its own + the other's, read from the other's shared
    // memory (a + b: the same bits whichever block adds) -- so every word gets one part a pair
    kog_cluster_sync();                               // both partials are complete
    const unsigned rank = kog_cluster_rank();
    constexpr int HALF = KOG_HIDDEN / 2;
    for (int i = rank * HALF + threadIdx.x; i < (int)(rank + 1) * HALF; i += blockDim.x)
        kog_red_add_u64(out + i, kog_sum_word(p, red[i] + kog_ld_cluster(red + i, rank ^ 1u)));
    kog_cluster_sync();                               // the other block has read this one's red
#endif
    __syncthreads();                                  // shared memory is free again
}
#endif

KOG_DEVICE void kog_stage_down_residual(const KogCtx& c, int layer) {
    kog_prof(c, layer * 16 + 12 + 0);
    const KogParams* p = c.p;
#if KOG_TP == 1
    __syncthreads();                                  // every warp's activations are in acts
    const int n_static = c.part[5] - c.part[4];
    const int n = n_static + *reinterpret_cast<const int*>(c.scratch + KOG_SLOT_FFN_GRABBED);
    kog_prof(c, layer * 16 + 13);
    kog_down_parts(p, layer, c.t, c.part[4], n_static, n);
#else
    const int r0 = c.part[6], r1 = c.part[7];
    auto ready = [&]() -> float {
        if (r0 >= r1) return -1.f;
        const float s = kog_load_activation<KOG_FFN>(p->act, kog_tag(c.t, layer, KOG_STAGE_GATE_UP),
                                                     c.smem, c.scratch, false);
        kog_prof(c, layer * 16 + 13);
        return s;
    };
    const kog_u32 x_out = kog_tag(c.t, layer, KOG_STAGE_DOWN);
    auto epi = [&](int row, float (&acc)[1], float) {
        if (threadIdx.x % KOG_WARP == 0) kog_tp_put_partial(c, 1, row, acc[0], x_out);
    };
    kog_gemv<KOG_FFN, 1>(p->w_down + (kog_u64)layer * KOG_HIDDEN * KOG_FFN, r0, r1, c.smem, c, ready, epi);
#endif
    kog_prof_end(c, layer * 16 + 12 + 2);
}

// ============================================================================================
// Stage final_norm_lm_head: logits[rows] = lm_head @ rmsnorm(x), and this block's argmax
// (lowest index on ties) for the greedy sampler.
// ============================================================================================
KOG_DEVICE void kog_stage_final_norm_lm_head(const KogCtx& c, int lm_index) {
    kog_prof(c, KOG_N_LAYERS * 16 + 0);
    const KogParams* p = c.p;
    const int r0 = c.part[8], r1 = c.part[9];
    const kog_u64 lm_off = p->all_logits ? (kog_u64)lm_index * KOG_VOCAB : 0ull;
    float* logits = p->logits + lm_off;
    float* dbg = kog_debug_row(c);
#if KOG_TP > 1
    // Rows are this rank's slice of the vocabulary, numbered globally (the host offsets
    // lm_head). The sampler of every rank needs the whole logits vector unless it is greedy
    // without a penalty; rank 0's block 0 carries the host's cancel flag to every rank, so
    // that all ranks stop at the same step.
    const bool gather = p->tp_gather_logits != 0;
    const kog_u32 cancel = (p->tp_rank == 0 && blockIdx.x == 0 && threadIdx.x == 0 &&
                            !p->all_logits) ? kog_ld_relaxed_system(p->host_ctl + 2) : 0u;
#endif
    float best_v = KOG_NEG_INF;
    int best_i = KOG_INT_MAX;
    constexpr bool DYN = KOG_DYN_PERMILLE > 0;
    auto ready = [&]() -> float {
#if KOG_TP > 1
        const float s = kog_tp_load_reduced(c, 1, kog_tag(c.t, KOG_N_LAYERS - 1, KOG_STAGE_DOWN));
#else
        if (!DYN && r0 >= r1) return -1.f;
        const float s = kog_load_activation<KOG_HIDDEN, true>(kog_xsum_in(p, c.t, KOG_N_LAYERS), kog_in_parts(KOG_N_LAYERS),
                                                              c.smem, c.scratch, true);
        if (dbg != nullptr)
            for (int i = kog_share_begin() + threadIdx.x; i < kog_share_end(); i += blockDim.x)
                dbg[KOG_DBG_DOWN + (kog_u64)(KOG_N_LAYERS - 1) * KOG_DBG_LAYER + i] = c.smem[i];
#endif
        kog_prof(c, KOG_N_LAYERS * 16 + 1);
        return s;
    };
    auto epi = [&](int row, float (&acc)[1], float scale) {
        const float v = acc[0] * scale;
        if (v > best_v || (v == best_v && row < best_i)) { best_v = v; best_i = row; }
        if (threadIdx.x % KOG_WARP == 0) {
            logits[row] = v;
            if (dbg != nullptr) dbg[KOG_DBG_LOGITS + row] = v;
#if KOG_TP > 1
            if (gather)
                for (int q = 0; q < KOG_TP; ++q)
                    if (q != p->tp_rank)
                        reinterpret_cast<float*>(p->tp_peers[KOG_PEER_LOGITS * KCCL_MAX_RANKS + q])[lm_off + row] = v;
#endif
        }
    };
    kog_gemv<KOG_HIDDEN, 1, DYN>(p->lm_head, r0, r1, KOG_TP > 1 ? c.x_full : c.smem, c, ready, epi,
                                 kog_dynamic<KOG_HIDDEN, 1>(c, KOG_CNT_DYN + KOG_N_LAYERS, lm_index,
                                                            p->lm_dyn_begin, p->lm_dyn_end));
    kog_prof_end(c, KOG_N_LAYERS * 16 + 2);
    if (!DYN && r0 >= r1) return;
    float bv;
    const int bi = kog_block_argmax(best_v, best_i, c.scratch, bv);
#if KOG_TP > 1
    // all-gather of the per-block argmax (entry rank * B + block on every rank), then a release
    // add to every rank's LM counter: the sampler of each rank sees all ranks' logits
    if (threadIdx.x < KOG_TP) {
        const int q = threadIdx.x;
        const kog_u64 e = (kog_u64)p->tp_rank * gridDim.x + blockIdx.x;
        reinterpret_cast<int*>(p->tp_peers[KOG_PEER_LM_PART_IDX * KCCL_MAX_RANKS + q])[e] = bi;
        reinterpret_cast<float*>(p->tp_peers[KOG_PEER_LM_PART_VAL * KCCL_MAX_RANKS + q])[e] = bv;
    }
    if (cancel != 0u)
        for (int q = 0; q < KOG_TP; ++q)
            kog_st_relaxed_system(reinterpret_cast<kog_u32*>(p->tp_peers[KOG_PEER_COUNTERS * KCCL_MAX_RANKS + q]) + KOG_CNT_CANCEL, 1u);
    __syncthreads();
    if (threadIdx.x < KOG_TP)
        kog_red_release_system(reinterpret_cast<kog_u32*>(p->tp_peers[KOG_PEER_COUNTERS * KCCL_MAX_RANKS + threadIdx.x]) + KOG_CNT_LM, 1u);
#else
    if (threadIdx.x == 0) {
        p->lm_part_idx[blockIdx.x] = bi;
        p->lm_part_val[blockIdx.x] = bv;
    }
    kog_signal_counter(kog_counter(c, KOG_CNT_LM));
#endif
}
