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

#ifndef KOG_GEMV_MAX_LOADS
#define KOG_GEMV_MAX_LOADS 8      // 16-byte loads per lane per tile
#endif
#ifndef KOG_PREFETCH_TILES
#define KOG_PREFETCH_TILES 1      // tiles issued before the wait for the input
#endif

// Waits until every word of the tagged vector src[0:N) carries `tag` (SUM: every residual-sum
// word has all its parts, sync.cuh), then puts the values in shared xs. Every thread issues
// all its 16-byte loads before the first check (one L2 round trip when the data is there) and
// re-polls only what was not ready. Returns 1/rms(src) when `norm`, else 1. All threads call
// it; it ends with a block barrier.
template <bool SUM>
KOG_DEVICE bool kog_word_ready(kog_u64 w, kog_u32 tag) { return SUM ? kog_sum_ready(w) : kog_tag_of(w) == tag; }
template <bool SUM>
KOG_DEVICE float kog_word_value(kog_u64 w) { return SUM ? kog_sum_value(w) : kog_value_of(w); }
template <int N, bool SUM = false>
KOG_DEVICE float kog_load_activation(const kog_u64* src, kog_u32 tag, float* xs, float* scratch,
                                     bool norm) {
    static_assert(N % 2 == 0, "tagged vectors are read in pairs");
    constexpr int P2 = N / 2;
    constexpr int PER = (P2 + KOG_THREADS - 1) / KOG_THREADS;
    const kog_u64 done = SUM ? (kog_u64)KOG_SUM_PARTS : (kog_u64)tag << 32;   // a ready word
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
// pre(unit): called by every lane when a dynamically grabbed unit's first tile is requested
// (down_residual loads the row's old value of x there, long before its epilogue needs it).
struct KogNoPre {
    KOG_DEVICE void operator()(int) const {}
};

// LD: the distance between rows in weights (a block of columns of a wider matrix: o_proj's
// head-group slices); K when the rows are whole.
template <int K, int UNIT, bool DYN = false, int LD = K, class Ready, class Epilogue, class Pre = KogNoPre>
KOG_DEVICE void kog_gemv(const kog_u16* W, int u_begin, int u_end, const float* xs, const KogCtx& ctx,
                         Ready ready, Epilogue epi, KogDynamic dyn = KogDynamic{}, Pre pre = Pre{}) {
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

    // Two tiles in flight
    // Two tiles in flight per warp (cur, nxt); tile 0 (and tile 1 with KOG_PREFETCH_TILES > 1)
    // is issued before the wait for the input.
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
#if KOG_PREFETCH_TILES > 0
    if (n_tiles > 0) load(0, cur);
#endif
#if KOG_PREFETCH_TILES > 1
    if (n_tiles > 1) load(1, nxt);
#endif

    const float scale = ready();
    if (!(scale > 0.f)) return;
#if KOG_PREFETCH_TILES <= 0
    if (n_tiles > 0) load(0, cur);                 // (timing variant: nothing in flight while waiting)
#endif
#if KOG_PREFETCH_TILES <= 1
    if (n_tiles > 1) load(1, nxt);
#endif

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
                    if (kt == 0) pre(u);
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

#ifndef KOG_DYN_PERMILLE
#define KOG_DYN_PERMILLE 0        // share of gate_up / lm_head (/ down) units handed out dynamically
#endif
#ifndef KOG_DOWN_DYN
#define KOG_DOWN_DYN 0            // 1: down_residual has a dynamic tail too (monokernel.py decides)
#endif

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
// Called by down_residual(t, l) before its wait for act (the fence overlaps that wait): zero
// this block's share of the residual sum of (t + 1, l), which shares its buffer with (t - 1, l).
// After every read of (t - 1, l): this block already passed its qkv(t, l) wait -- for l > 0 on
// x(t, l - 1), which needed act, the sum, every group's attn_out and the qkv rows of every
// block (placement.py: every block owns some) of (t, l - 1); at l = 0 on TOK(t), released after
// every block's LM head of t - 1 or, inside the prompt, after x(t - 1, L - 1), the same chain
// one layer up -- and each block made its reads of step t - 1 before those writes of step t
// (with one layer, its down rows carry it: placement.py). Before every part of (t + 1, l): each
// producer of one (down_residual(t + 1, l - 1), o_proj(t + 1, l), the sampler's embedding at t)
// follows this block's later writes -- its qkv rows of step t + 1 or, for the sampler's
// embedding, its qkv(t, L - 1) rows (with one layer: its down rows of step t) -- and the fence
// orders the zeroing before those writes. Relaxed atomic stores, as every other access to
// the sums.
KOG_DEVICE void kog_xsum_zero_next(const KogCtx& c, int layer) {
    kog_u64* next = kog_xsum(c.p, c.t + 1, layer);
    const int z0 = (int)((long long)blockIdx.x * KOG_HIDDEN / gridDim.x);
    const int z1 = (int)((long long)(blockIdx.x + 1) * KOG_HIDDEN / gridDim.x);
    if (z0 + (int)threadIdx.x < z1) {
        for (int i = z0 + threadIdx.x; i < z1; i += blockDim.x) kog_st_relaxed_u64(next + i, 0ull);
        kog_fence_gpu();
    }
}
// Rows [r0, r0 + n) of a residual sum (xsum, sync.cuh) into shared `dst`, each once all its
// parts are in. `first` is the word of row r0 + threadIdx.x, loaded by the caller before its
// activation polls so that the two round trips overlap. All threads call it; it ends with a
// block barrier.
KOG_DEVICE void kog_sum_rows_to_shared(float* dst, const kog_u64* sum, int r0, int n, kog_u64 first) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        kog_u64 w = i == (int)threadIdx.x ? first : kog_ld_tagged(sum + r0 + i);
        while (!kog_sum_ready(w)) { w = kog_ld_tagged(sum + r0 + i); }
        dst[i] = kog_sum_value(w);
    }
    __syncthreads();
}
#endif

// ============================================================================================
// Stage o_proj_residual: x += wo @ attn_out.
// One GPU: split over the kv head groups (o_proj's reduction over q_dim). Item (g, s) waits only
// for head group g's attention output (the G * HD words its combiner wrote), multiplies it by
// columns [g * G * HD, (g + 1) * G * HD) of row slice s of wo and adds the products into the
// residual sums of (t, l) (sync.cuh), where down_residual of layer l-1 (or the embedding) has
// added the old x. Items spread over the blocks from block 0 up; attention units go from the
// top of the grid down, and an item waits only for a combiner, which never waits for an item.
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
    kog_u64* sum = kog_xsum(p, c.t, layer);
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
// ============================================================================================
KOG_DEVICE void kog_stage_ffn_norm_gate_up_silu(const KogCtx& c, int layer) {
    kog_prof(c, layer * 16 + 9 + 0);
    const KogParams* p = c.p;
    const int u0 = c.part[4], u1 = c.part[5];
    float* dbg = kog_debug_row(c);
    constexpr bool DYN = KOG_DYN_PERMILLE > 0;
    auto ready = [&]() -> float {
#if KOG_TP > 1
        const float s = kog_tp_load_reduced(c, 0, kog_tag(c.t, layer, KOG_STAGE_O));
#else
        if (!DYN && u0 >= u1) return -1.f;
        const float s = kog_load_activation<KOG_HIDDEN, true>(kog_xsum(p, c.t, layer), 0u,
                                                              c.smem, c.scratch, true);
#endif
        kog_prof(c, layer * 16 + 10);
        return s;
    };
    const kog_u32 tag = kog_tag(c.t, layer, KOG_STAGE_GATE_UP);
    auto epi = [&](int j, float (&acc)[2], float scale) {
        if (threadIdx.x % KOG_WARP == 0) {
            const float g = acc[0] * scale, u = acc[1] * scale;
            const float a = g / (1.f + expf(-g)) * u;
            kog_st_tagged(p->act + j, a, tag);
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
// Stage down_residual: x[rows] += w_down @ act
// ============================================================================================
KOG_DEVICE void kog_stage_down_residual(const KogCtx& c, int layer) {
    kog_prof(c, layer * 16 + 12 + 0);
    const KogParams* p = c.p;
    const int r0 = c.part[6], r1 = c.part[7];
    float* dbg = kog_debug_row(c);
    constexpr bool DYN = KOG_DYN_PERMILLE > 0 && KOG_DOWN_DYN;
    // One GPU: the old x is the residual sum of (t, l); the new x also goes into the sum of
    // (t, l + 1). (Its addresses are recomputed where used: pointers kept live across the
    // weight stream cost registers the GEMV loop spills for.)
    float* x_old = c.x_own;
    auto ready = [&]() -> float {
#if KOG_TP == 1
        kog_xsum_zero_next(c, layer);     // (its fence overlaps the wait for act)
#endif
        if (!DYN && r0 >= r1) return -1.f;
#if KOG_TP == 1
        // old x of the static rows: loads issued now, checked after the polls
        const kog_u64* sum = kog_xsum(p, c.t, layer);
        const kog_u64 xw = threadIdx.x < r1 - r0 ? kog_ld_tagged(sum + r0 + threadIdx.x) : 0ull;
#endif
        const float s = kog_load_activation<KOG_FFN>(p->act, kog_tag(c.t, layer, KOG_STAGE_GATE_UP),
                                                     c.smem, c.scratch, false);
#if KOG_TP == 1
        kog_sum_rows_to_shared(x_old, sum, r0, r1 - r0, xw);
        if (dbg != nullptr)
            for (int i = threadIdx.x; i < r1 - r0; i += blockDim.x)
                dbg[KOG_DBG_O_PROJ + (kog_u64)layer * KOG_DBG_LAYER + r0 + i] = x_old[i];
#endif
        kog_prof(c, layer * 16 + 13);
        return s;
    };
    const kog_u32 x_out = kog_tag(c.t, layer, KOG_STAGE_DOWN);
    const KogDynamic dyn = kog_dynamic<KOG_FFN, 1>(c, KOG_CNT_DYN_DOWN + layer, c.t - p->start_pos,
                                                   p->down_dyn_begin, KOG_HIDDEN);
#if KOG_TP > 1
    auto epi = [&](int row, float (&acc)[1], float) {
        if (threadIdx.x % KOG_WARP == 0) kog_tp_put_partial(c, 1, row, acc[0], x_out);
    };
    kog_gemv<KOG_FFN, 1, DYN>(p->w_down + (kog_u64)layer * KOG_HIDDEN * KOG_FFN, r0, r1, c.smem, c,
                              ready, epi, dyn);
#else
    // dynamic rows (the tail, any block): the load of their old x is issued when the row is
    // grabbed (with its first weight tile) and checked in the epilogue
    constexpr int GRAB = KogGemvShape<KOG_FFN, 1>::GRAB;
    kog_u64 old_dyn[GRAB];
    auto pre = [&](int row) {
        old_dyn[(row - p->down_dyn_begin) % GRAB] = kog_ld_tagged(kog_xsum(p, c.t, layer) + row);
    };
    auto epi = [&](int row, float (&acc)[1], float) {
        if (threadIdx.x % KOG_WARP == 0) {
            float old;
            if (row < r1) {
                old = x_old[row - r0];
            } else {
                kog_u64 w = old_dyn[(row - p->down_dyn_begin) % GRAB];
                while (!kog_sum_ready(w)) { w = kog_ld_tagged(kog_xsum(p, c.t, layer) + row); }
                old = kog_sum_value(w);
                if (dbg != nullptr) dbg[KOG_DBG_O_PROJ + (kog_u64)layer * KOG_DBG_LAYER + row] = old;
            }
            const float v = old + acc[0];
            kog_st_x(c, row, v, x_out);
            if (layer + 1 < KOG_N_LAYERS) kog_red_add_u64(kog_xsum(p, c.t, layer + 1) + row, kog_sum_word(p, v));
            if (dbg != nullptr) dbg[KOG_DBG_DOWN + (kog_u64)layer * KOG_DBG_LAYER + row] = v;
        }
    };
    kog_gemv<KOG_FFN, 1, DYN>(p->w_down + (kog_u64)layer * KOG_HIDDEN * KOG_FFN, r0, r1, c.smem, c,
                              ready, epi, dyn, pre);
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
        const float s = kog_load_activation<KOG_HIDDEN>(c.xr, kog_tag(c.t, KOG_N_LAYERS - 1, KOG_STAGE_DOWN),
                                                        c.smem, c.scratch, true);
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
