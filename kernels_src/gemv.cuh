// ============================================================================================
// gemv.cuh -- batch-1 matrix-vector streaming, the tensor-parallel partials and the residual
// sums' zeroing: what the GEMV stages share. The stages have their own files: o_proj.cuh,
// gate_up.cuh, down.cuh, lm_head.cuh (attn_norm_qkv: norm_rope.cuh).
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
// run time, KOG_DOWN_DEPTH rows a thread of down_residual keeps in flight, KOG_POLL_SENTINEL
// a residual sum polled on its last pair before it is read, KOG_ZERO_EARLY the next position's
// sums zeroed at o_proj's start instead of in gate_up's wait (kog_xsum_zero_next),
// KOG_GATE_UP_EARLY / KOG_QKV_EARLY the tiles a warp of gate_up / attn_norm_qkv issues before
// its wait (kog_gemv's EARLY).
#if !defined(KOG_GEMV_MAX_LOADS) || !defined(KOG_DYN_PERMILLE) || !defined(KOG_DOWN_DEPTH) || \
    !defined(KOG_POLL_SENTINEL) || !defined(KOG_ZERO_EARLY) || !defined(KOG_GATE_UP_EARLY) || !defined(KOG_QKV_EARLY)
#error "GEMV knobs come from kernels.py (model_defines)"
#endif

// Waits until every word of the tagged vector src[0:N) carries `tag` (SUM: every residual-sum
// word has `tag` parts, sync.cuh), then puts the values in shared xs. Every thread issues
// all its 16-byte loads before the first check (one L2 round trip when the data is there) and
// re-polls only what was not ready; with KOG_POLL_SENTINEL a residual sum is first polled on
// its last pair by one thread a copy (two round trips when the data is there). COPIES > 1 (an
// in sum, sync.cuh KOG_IN_COPIES): copy r at src + r * N holds kog_copy_parts<COPIES>(tag, r)
// parts; the value is the copies' words added. Returns 1/rms(src) when `norm`, else 1. All
// threads call it; it ends with a block barrier.
template <bool SUM>
KOG_DEVICE bool kog_word_ready(kog_u64 w, kog_u32 tag) { return SUM ? kog_sum_ready(w, tag) : kog_tag_of(w) == tag; }
template <bool SUM>
KOG_DEVICE float kog_word_value(kog_u64 w) { return SUM ? kog_sum_value(w) : kog_value_of(w); }
template <int N, bool SUM = false, int COPIES = 1>
KOG_DEVICE float kog_load_activation(const kog_u64* src, kog_u32 tag, float* xs, float* scratch,
                                     bool norm) {
    static_assert(N % 2 == 0, "tagged vectors are read in pairs");
    static_assert(COPIES == 1 || SUM, "copies are residual sums");
    constexpr int P2 = N / 2;
    constexpr int PER = (P2 + KOG_THREADS - 1) / KOG_THREADS;
    kog_u32 want[COPIES];
#pragma unroll
    for (int r = 0; r < COPIES; ++r) want[r] = kog_copy_parts<COPIES>(tag, r);   // (one copy: tag)
    if (SUM && KOG_POLL_SENTINEL) {
        // one thread a copy polls the copy's last pair until it is complete, then the block
        // reads the sum: while the parts land, one line a copy is re-read, not every line by
        // every thread. A hint only, the read below checks every word (in sums: the last pair is
        // among the last adds of down -- of a pair's rank 1; mid sums: of the o_proj items of the
        // last row slice); build_plan.py decides per build
        if ((int)threadIdx.x < COPIES) {
            const int r = threadIdx.x;
            // (not want[r]: a run-time index puts want[] in local memory; with the one-copy case
            // spelled out ptxas spills least: Qwen2.5-0.5B 24 B, 1B 72 B, as without the sentinel)
            const kog_u32 wr = COPIES == 1 ? tag : kog_copy_parts<COPIES>(tag, r);
            kog_u64 a, b;
            do { kog_ld_tagged2(src + r * N + N - 2, a, b); }
            while (!kog_word_ready<SUM>(a, wr) || !kog_word_ready<SUM>(b, wr));
        }
        __syncthreads();
    }
    kog_u64 w[PER][COPIES][2];
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int i = threadIdx.x + k * KOG_THREADS;
#pragma unroll
        for (int r = 0; r < COPIES; ++r) {
            w[k][r][0] = w[k][r][1] = SUM ? (kog_u64)want[r] : (kog_u64)tag << 32;   // a ready word
            if (P2 % KOG_THREADS == 0 || i < P2) kog_ld_tagged2(src + r * N + 2 * i, w[k][r][0], w[k][r][1]);
        }
    }
    for (;;) {
        bool ready = true;
#pragma unroll
        for (int k = 0; k < PER; ++k) {
            const int i = threadIdx.x + k * KOG_THREADS;
#pragma unroll
            for (int r = 0; r < COPIES; ++r)
                if (!kog_word_ready<SUM>(w[k][r][0], want[r]) || !kog_word_ready<SUM>(w[k][r][1], want[r])) {
                    ready = false;
                    kog_ld_tagged2(src + r * N + 2 * i, w[k][r][0], w[k][r][1]);
                }
        }
        if (ready) break;
    }
    __syncthreads();                              // xs and the scratch are free (kog_block_sum, below)
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int i = threadIdx.x + k * KOG_THREADS;
        if (P2 % KOG_THREADS == 0 || i < P2) {
            kog_u64 wa = w[k][0][0], wb = w[k][0][1];
#pragma unroll
            for (int r = 1; r < COPIES; ++r) {     // (the counts add too: only the value is read)
                wa += w[k][r][0];
                wb += w[k][r][1];
            }
            const float a = kog_word_value<SUM>(wa), b = kog_word_value<SUM>(wb);
            xs[2 * i] = a;
            xs[2 * i + 1] = b;
            ss = fmaf(a, a, fmaf(b, b, ss));
        }
    }
    if (norm) {
        ss = kog_block_sum(ss, scratch);          // its barrier also publishes xs
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
// evens out multiprocessors that get less bandwidth than others. A grab is asked for one grab
// ahead and its tiles continue the warp's stream of two tiles in flight (kog_gemv).
struct KogDynamic {
    kog_u32* cursor;
    kog_u32 base;
    int begin, end;
};
struct KogNothing {
    KOG_DEVICE void operator()() const {}
};
// LD: the distance between rows in weights (a block of columns of a wider matrix: o_proj's
// head-group slices); K when the rows are whole. after_static(): each thread, once its warp's
// static units are done (before the dynamic tail's products; its first tile may be in flight).
// EARLY: how many of the warp's first two tiles are issued before the wait (below).
template <int K, int UNIT, bool DYN = false, int LD = K, int EARLY = 2, class Ready, class Epilogue,
          class AfterStatic = KogNothing>
KOG_DEVICE void kog_gemv(const kog_u16* W, int u_begin, int u_end, const float* xs, const KogCtx& ctx,
                         Ready ready, Epilogue epi, KogDynamic dyn = KogDynamic{},
                         AfterStatic after_static = AfterStatic{}) {
    static_assert(K % 8 == 0 && LD % 8 == 0, "rows must be a whole number of 16-byte vectors");
    static_assert(LD == K || !DYN, "a dynamic tail streams whole rows");
    static_assert(EARLY == 1 || EARLY == 2, "one or two tiles issued before the wait");
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
    // or none issued early in every GEMV measured 6% / 3% slower on Llama-3.2-1B, H200,
    // 2026-11-22: kernels_src/PERF.md), or with EARLY 1 the second after it: the wait's loads
    // then queue behind one tile, not two (gate_up on pairs up to hidden 2,048, qkv the same on
    // GPUs with an H200's memory: build_plan.py).
    kog_vec4 cur[NLT], nxt[NLT];
    auto static_unit = [&](int i) { return first + (i / TPU) * n_warps; };   // of static tile i
    // tile kt of unit u into v
    auto load_tile = [&](int u, int kt, kog_vec4 (&v)[NLT]) {
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
    auto load = [&](int i, kog_vec4 (&v)[NLT]) { load_tile(static_unit(i), i % TPU, v); };
    if (n_tiles > 0) load(0, cur);
    if (n_tiles > 1 && EARLY == 2) load(1, nxt);

    const float scale = ready();
    if (!(scale > 0.f)) return;
    if (n_tiles > 1 && EARLY == 1) load(1, nxt);

    const float4* x4 = reinterpret_cast<const float4*>(xs);
    float acc[UNIT];
#pragma unroll
    for (int r = 0; r < UNIT; ++r) acc[r] = 0.f;
    // The one tile dot product: tile kt of a unit (its NLT loads v) into acc; then (finish),
    // after the unit's last tile, the warp sum goes to the epilogue of unit u. The loop issues
    // the tile after next between the two: its loads do not wait for the warp sum.
    // Each load's 8 products are summed on their own (NLT independent chains, not one chain of
    // 8 NLT dependent FMAs), then added into the row's accumulator; a tile inside one row
    // (CPRP a multiple of TILE) picks its row once, without a branch a load.
    constexpr bool ROW_TILES = UNIT > 1 && FULL && CPRP % TILE == 0;
    auto dot_tile = [&](int kt, const kog_vec4 (&v)[NLT]) {
        float part[NLT];
#pragma unroll
        for (int j = 0; j < NLT; ++j) {
            const int c = kt * TILE + j * KOG_WARP + lane;
            const int row = c / CPRP;
            const int col = c - row * CPRP;
            part[j] = 0.f;
            if ((FULL || c < CPU) && (!SLICE || col < CPR)) {
                const float4 a = x4[2 * col], b = x4[2 * col + 1];
                const float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
                part[j] = kog_dot8(v[j], xv, 0.f);
            }
            if (UNIT > 1 && !ROW_TILES) {
#pragma unroll
                for (int r = 0; r < UNIT; ++r) acc[r] += row == r ? part[j] : 0.f;
            }
        }
        if (UNIT == 1 || ROW_TILES) {
            const float sum = kog_sum_pairwise(part);
            const int row = UNIT == 1 ? 0 : kt * TILE / CPRP;
#pragma unroll
            for (int r = 0; r < UNIT; ++r) acc[r] += row == r ? sum : 0.f;
        }
    };
    auto finish = [&](int kt, int u) {
        if (kt == TPU - 1) {
#pragma unroll
            for (int r = 0; r < UNIT; ++r) acc[r] = kog_warp_sum(acc[r]);
            epi(u, acc, scale);
#pragma unroll
            for (int r = 0; r < UNIT; ++r) acc[r] = 0.f;
        }
    };
    if constexpr (DYN) {
        // One stream of tiles: the static units' then the grabbed units', loaded two ahead of
        // the dot products across the boundary and across grabs. A grab's atomic is issued NT
        // tiles before its first tile is loaded (the first one NT tiles before the static
        // tiles end, or at the first tile after the wait when the warp has fewer), so neither
        // its round trip nor a refill of the two tiles falls between units. Still exactly one
        // failed grab a warp; every grab follows ready() (the cursor's base for this position
        // holds only after the wait, KogDynamic).
        constexpr int GRAB = KogGemvShape<K, UNIT>::GRAB;
        constexpr int NT = GRAB * TPU;                          // tiles per grab
        const int n_grabs = (dyn.end - dyn.begin + GRAB - 1) / GRAB;
        const int ask_at = n_tiles > NT ? n_tiles - NT : 0;     // stream tile the first ask precedes
        int ld_i = n_tiles > 1 ? 2 : n_tiles;                   // stream tiles handed to a buffer
        int r = 0, g_base = 0, v_pend = 0;
        bool asked = false, done = false;
        auto ask = [&]() {
            if (lane == 0) v_pend = (int)(atomicAdd(dyn.cursor, 1u) - dyn.base);
            asked = true;
        };
        // the unit and tile of the next stream tile (u < 0: the stream is over; u >= dyn.end:
        // past the last unit in the last grab, a tile with nothing to do), and its loads
        auto next = [&](int& u, int& kt, kog_vec4 (&v)[NLT]) {
            if (!asked && !done && ld_i >= ask_at) ask();
            if (ld_i < n_tiles) {
                u = static_unit(ld_i);
                kt = ld_i % TPU;
            } else if (done) {
                u = -1;
                return;
            } else {
                if (r == 0) {
                    const int g = kog_shfl_int(v_pend, 0);
                    asked = false;
                    if (g >= n_grabs) {
                        done = true;
                        u = -1;
                        return;
                    }
                    g_base = dyn.begin + g * GRAB;
                    ask();                                      // the grab after this one
                }
                u = g_base + r / TPU;
                kt = r % TPU;
                r = r + 1 == NT ? 0 : r + 1;
            }
            if (ld_i++ < n_tiles || u < dyn.end) load_tile(u, kt, v);
        };
        int ua = n_tiles > 0 ? static_unit(0) : -1, ka = 0;
        int ub = n_tiles > 1 ? static_unit(1) : -1, kb = 1 % TPU;
        if (ua < 0) next(ua, ka, cur);
        if (ub < 0) next(ub, kb, nxt);
        int ci = 0;                                             // stream tiles consumed
        if (n_tiles == 0) after_static();
        // tile (u, kt) in v: its products, the stream's next tile into v, then its finish
        auto take = [&](int& u, int& kt, kog_vec4 (&v)[NLT]) {
            const int u_done = u, kt_done = kt;
            const bool real = ci < n_tiles || u < dyn.end;
            if (real) dot_tile(kt, v);
            next(u, kt, v);
            if (real) finish(kt_done, u_done);
            if (++ci == n_tiles) after_static();
        };
        // (unrolled by two, as below: the buffers swap roles without register moves)
        while (ua >= 0) {
            take(ua, ka, cur);
            if (ub < 0) break;
            take(ub, kb, nxt);
        }
        return;
    }
    // Unrolled by two so the buffers swap roles without register moves (a move of a pending
    // load would stall until it lands, leaving one tile in flight instead of two).
    for (int i = 0; i < n_tiles; i += 2) {
        dot_tile(i % TPU, cur);
        if (i + 2 < n_tiles) load(i + 2, cur);
        finish(i % TPU, static_unit(i));
        if (i + 1 < n_tiles) {
            dot_tile((i + 1) % TPU, nxt);
            if (i + 3 < n_tiles) load(i + 3, nxt);
            finish((i + 1) % TPU, static_unit(i + 1));
        }
    }
    after_static();
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
    __syncthreads();                                 // x_full and the scratch are free (kog_block_sum)
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
    ss = kog_block_sum(ss, c.scratch);               // its barrier also publishes x_full
    return rsqrtf(ss / (float)KOG_HIDDEN + KOG_EPS);
}
#endif


#if KOG_TP == 1
// Called by ffn_norm_gate_up_silu(t, l) before its wait for mid(t, l), or with KOG_ZERO_EARLY by
// o_proj_residual(t, l) at its start: zero this block's share of in(t + 1, l) and mid(t + 1, l)
// (and, at the last layer, of in(t + 1, L)), which share their buffers with position t - 1's
// sums (sync.cuh). The zeroing threads fence once a step, at the last layer, after all the
// step's zero stores: the fence waits for every load the thread has in flight (in gate_up's
// wait, the gate_up tiles just issued), and one a layer cost Qwen2.5-0.5B 1.4 %, SmolLM2 1.1 %
// (PERF.md). In short: TOK(t + 1), which every access to t + 1's sums follows, comes after the
// sampler's (or the LM blocks') wait on all of in(t, L), which holds each zeroing thread's add
// in down(t, L - 1), after its fence (down.cuh: every thread of a share adds a word there).
// After every read of t - 1's: this block passed its wait on in(t, l) in attn_norm_qkv(t, l);
// for l > 0 that sum holds every block's down_residual(t, l - 1) (alone or in its pair's part,
// added after the pair's cluster barrier), so every block is
// past its qkv(t, l - 1) and gate_up(t, l - 1) -- later than its reads of in(t - 1, l),
// mid(t - 1, l) (and the LM head's or the sampler's of in(t - 1, L)); for l = 0 in(t, 0) is
// the embedding of t, written by the sampler of t - 1 after every LM-head block's release
// (each past its wait on in(t - 1, L), which holds every block's last down) or, inside the
// prompt, after its own wait on in(t - 1, L): the same chain. Before every part of t + 1's:
// a part of in(t + 1, l), l > 0, comes from a block past its wait on mid(t + 1, l - 1), whose
// words of this block's rows hold the part this block adds in attn_norm_qkv(t + 1, l - 1) (row
// i by the thread that zeroed it) -- a write after the fence of t (a block with no rows zeroes
// nothing); the embedding in in(t + 1, 0) and every part of mid(t + 1, 0) follow the sampler of
// t, past every block's last down of t, down(t, L - 1), after that fence, in which every
// zeroing thread adds a word of in(t, L) (thread k row k alone; row k of its rank's half in a
// pair); parts of mid(t + 1, l) follow the wait on in(t + 1, l), which holds this block's
// down(t + 1, l - 1) (or, l = 0, the embedding: above). Readers of t + 1's sums are past
// TOK(t + 1) too. Relaxed atomic stores, as every other access to the sums.
KOG_DEVICE void kog_xsum_zero_next(const KogCtx& c, int layer) {
    const int z0 = kog_share_begin(), z1 = kog_share_end();
    if (z0 + (int)threadIdx.x < z1) {
        kog_u64* in = kog_xsum_in(c.p, c.t + 1, layer);
        kog_u64* mid = kog_xsum_mid(c.p, c.t + 1, layer);
        kog_u64* last = kog_xsum_in(c.p, c.t + 1, KOG_N_LAYERS);
        for (int i = z0 + threadIdx.x; i < z1; i += blockDim.x) {
#pragma unroll
            for (int r = 0; r < KOG_IN_COPIES; ++r) {     // every copy of the in sums' rows
                kog_st_relaxed_u64(in + r * KOG_HIDDEN + i, 0ull);
                if (layer == KOG_N_LAYERS - 1) kog_st_relaxed_u64(last + r * KOG_HIDDEN + i, 0ull);
            }
            kog_st_relaxed_u64(mid + i, 0ull);
        }
        if (layer == KOG_N_LAYERS - 1) kog_fence_gpu();       // (once a step: above)
    }
}
#endif
