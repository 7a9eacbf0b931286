// ============================================================================================
// gate_up.cuh -- stage ffn_norm_gate_up_silu:
//   act[j] = silu(gate_j . n) * (up_j . n), n = rmsnorm(x).
// Gate and up rows are interleaved (unit j = rows 2j, 2j+1), so one warp finishes act[j].
// One GPU: x is mid(t, l); act stays in this block's shared memory for its own
// down_residual (no other block reads it). Tensor parallel: act is a tagged vector.
// ============================================================================================
#pragma once
#include "gemv.cuh"

#if KOG_TP == 1
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

// down_residual's thread layout: a thread owns 16-byte chunk `ch` of a w_down row (8 outputs;
// CPT chunks when a row has more chunks than the block has threads) in row group `grp`; the G
// groups split the block's units (slots grp, grp + G, ...). Threads past the last whole group
// (grp >= G) stream nothing. Staging: KOG_DOWN_DEPTH rows a thread, [D][CPT][threads] 16-byte
// slots of shared memory.
struct KogDownLayout {
    static constexpr int CH = KOG_FFN_CH, G = KOG_FFN_GROUPS, D = KOG_DOWN_DEPTH;
    static constexpr int CPT = (CH + KOG_THREADS - 1) / KOG_THREADS;   // chunks a thread
    int grp, ch;
    KOG_DEVICE KogDownLayout()
        : grp(G > 1 ? (int)threadIdx.x / CH : 0), ch(G > 1 ? (int)threadIdx.x % CH : (int)threadIdx.x) {}
    KOG_DEVICE static bool has(int ch, int k) { return CH % KOG_THREADS == 0 || ch + k * KOG_THREADS < CH; }
    // this thread's staging slot of its row i, chunk k
    KOG_DEVICE static kog_vec4* stage(int i, int k) {
        return reinterpret_cast<kog_vec4*>(kog_smem() + KOG_FFN_STAGE_OFF) + ((i % D) * CPT + k) * KOG_THREADS
             + threadIdx.x;
    }
};

// down_residual's stream: this thread's row i (of its unit slots; `mine` of them) of w_down
// into its staging slot i % KOG_DOWN_DEPTH, one cp.async group (empty past its rows and for
// the threads of no group). A thread reads back only what it copied: no barrier.
KOG_DEVICE void kog_down_issue(const KogParams* p, int layer, int u0, int n_static, int mine, int i) {
    using Lay = KogDownLayout;
    const Lay lay;
    const int* grabbed_unit = reinterpret_cast<const int*>(kog_smem() + KOG_FFN_ACT_OFF + KOG_FFN_SLOTS);
    const kog_vec4* W = reinterpret_cast<const kog_vec4*>(p->w_down) + (kog_u64)layer * KOG_FFN * Lay::CH;
    if (lay.grp < Lay::G && i < mine) {
        const int slot = lay.grp + i * Lay::G;
        const int unit = slot < n_static ? u0 + slot : grabbed_unit[slot];
#pragma unroll
        for (int k = 0; k < Lay::CPT; ++k)
            if (Lay::has(lay.ch, k))
                kog_copy16(Lay::stage(i, k), W + (kog_u64)unit * Lay::CH + lay.ch + k * KOG_THREADS);
    }
    kog_copy16_commit();
}
// down_residual's first KOG_DOWN_DEPTH - 1 rows are issued by gate_up once a warp's static
// units are done, when they are all static units' (known before the dynamic tail): they land
// during the tail and the block barrier that starts down (PERF.md, 2026-12-04). The test: the
// slot of row D - 2 of the last row group, G - 1 + (D - 2) G, is a static unit's. down relies
// on gate_up having issued them whenever this holds: gate_up returns before its units (ready()
// <= 0) only where it has none (n_static 0).
KOG_DEVICE bool kog_down_prefetched(int n_static) {
    return (KOG_FFN_GROUPS - 1) + (KOG_DOWN_DEPTH - 2) * KOG_FFN_GROUPS < n_static;
}
#endif

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
#if !KOG_ZERO_EARLY
        kog_xsum_zero_next(c, layer);     // (at the last layer its fence waits for the tiles in flight)
#endif
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
#if KOG_TP == 1
    auto down_first_rows = [&]() {
        if (kog_down_prefetched(u1 - u0))              // (rows 0 .. D - 2 all exist: mine = D - 1)
            for (int i = 0; i < KOG_DOWN_DEPTH - 1; ++i)
                kog_down_issue(p, layer, u0, u1 - u0, KOG_DOWN_DEPTH - 1, i);
    };
#else
    KogNothing down_first_rows;
#endif
    constexpr int EARLY = KOG_GATE_UP_EARLY;         // tiles issued before the wait (gemv.cuh)
    const kog_u16* w = p->w_gate_up + (kog_u64)layer * 2 * KOG_FFN * KOG_HIDDEN;
    kog_gemv<KOG_HIDDEN, 2, DYN, KOG_HIDDEN, EARLY>(w, u0, u1, KOG_TP > 1 ? c.x_full : c.smem, c, ready, epi,
                                                    kog_dynamic<KOG_HIDDEN, 2>(c, KOG_CNT_DYN + layer,
                                                                               c.t - p->start_pos,
                                                                               p->gate_up_dyn_begin, KOG_FFN),
                                                    down_first_rows);
    kog_prof_end(c, layer * 16 + 9 + 2);
}
