// ============================================================================================
// down.cuh -- stage down_residual: x += w_down @ act.
// One GPU: no wait. A block multiplies the activations of the FFN units it ran (its own
// shared memory) by those units' columns of w_down -- stored transposed, (L, FFN, HIDDEN): a
// unit's column is one contiguous row -- which gives its partial of EVERY row of x, and adds
// it into in(t, l + 1) (one part per cluster of KOG_CLUSTER blocks, summed in distributed
// shared memory; for the rows of each block's share plus x after o_proj).
// Thread layout: KogDownLayout (gate_up.cuh); the row groups' partials are summed in shared
// memory at the end.
// Tensor parallel: rows of x, each rank's partial of every row to every rank (kccl.cuh).
// ============================================================================================
#pragma once
#include "gate_up.cuh"

#if KOG_TP == 1
// The block's part of in(t, l + 1) from its n activations (slots [0, n_static): units u0 + slot;
// then the grabbed units). A thread streams its chunk of its units' rows through its own
// KOG_DOWN_DEPTH slots of shared memory (cp.async: no registers hold loads in flight, and a
// thread reads back only what it copied, so no barrier); KOG_DOWN_DEPTH - 1 rows in flight.
// Which block runs a grabbed unit (the dynamic tail) varies run to run, so a grabbed unit's
// products are not added into the block's float sums: each is rounded to the residual sums'
// fixed point on its own and added as an integer (q), and the part is the same bits whichever
// block ran the unit (SYNC.md, run-to-run reproducibility). A thread leaves its integer
// partials in its own first 4 staging slots a chunk (kog_down_q); with fewer slots
// (KOG_DOWN_DEPTH < 4: HIP's 1) grabbed units are added as floats like the static ones.
KOG_DEVICE void kog_axpy8_fixed(const kog_vec4& w, float a, long long* q, bool& bad) {
    const float as = a * (float)(1 << KOG_SUM_FRAC);
    constexpr float LIM = (float)(1ll << (63 - KOG_SUM_COUNT_BITS));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const kog_u32 p = KOG_V4(w, i);
        const float lo = as * kog_w_lo(p), hi = as * kog_w_hi(p);
        bad |= !(fabsf(lo) < LIM) || !(fabsf(hi) < LIM);
        q[2 * i] += __float2ll_rn(lo);
        q[2 * i + 1] += __float2ll_rn(hi);
    }
}
// where the integer partial of row i of row group g is: in the staging slots of the thread that
// summed it (KogDownLayout: chunk c = i / 8, value i % 8; 16-byte slot 4 k + e / 2 of chunk k)
KOG_DEVICE long long* kog_down_q(int g, int i) {
    using Lay = KogDownLayout;
    const int c = i / 8, e = i % 8;
    const int tid = Lay::G > 1 ? g * Lay::CH + c : c % KOG_THREADS, k = Lay::G > 1 ? 0 : c / KOG_THREADS;
    return reinterpret_cast<long long*>(kog_smem() + KOG_FFN_STAGE_OFF) + ((4 * k + e / 2) * KOG_THREADS + tid) * 2 + e % 2;
}
KOG_DEVICE void kog_down_parts(const KogParams* p, int layer, int t, int u0, int n_static, int n) {
    using Lay = KogDownLayout;
    constexpr int G = Lay::G, D = Lay::D, CPT = Lay::CPT;
    constexpr bool FIXED = KOG_DYN_PERMILLE > 0 && D >= 4;
    const Lay lay;
    float* smem = kog_smem();
    const float* xs = smem;
    const float* acts = smem + KOG_FFN_ACT_OFF;
    const int mine = lay.grp < G ? (n - lay.grp + G - 1) / G : 0;       // slots grp, grp + G, ...
    const int mine_static = lay.grp < G ? min(mine, (n_static - lay.grp + G - 1) / G) : 0;
    auto issue = [&](int i) { kog_down_issue(p, layer, u0, n_static, mine, i); };
    float acc[CPT][8];
    long long q[CPT][8];                              // (FIXED: the grabbed units' products, fixed point)
    bool bad = false;
#pragma unroll
    for (int k = 0; k < CPT; ++k)
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            acc[k][e] = 0.f;
            q[k][e] = 0;
        }
    if (!kog_down_prefetched(n_static))                // (else gate_up issued them)
#pragma unroll
        for (int i = 0; i < D - 1; ++i) issue(i);
    for (int i = 0; i < (FIXED ? mine_static : mine); ++i) {
        issue(i + D - 1);
        kog_copy16_wait_groups<D - 1>();              // row i is in
        const float a = acts[lay.grp + i * G];
#pragma unroll
        for (int k = 0; k < CPT; ++k)
            if (Lay::has(lay.ch, k)) kog_axpy8(*Lay::stage(i, k), a, acc[k]);
    }
    if constexpr (FIXED)
        for (int i = mine_static; i < mine; ++i) {
            issue(i + D - 1);
            kog_copy16_wait_groups<D - 1>();
            const float a = acts[lay.grp + i * G];
#pragma unroll
            for (int k = 0; k < CPT; ++k)
                if (Lay::has(lay.ch, k)) kog_axpy8_fixed(*Lay::stage(i, k), a, q[k], bad);
        }
    kog_copy16_wait_groups<0>();
    // the block's part of in(t, l + 1): its partial of every row, plus x for its share's rows
    kog_u64* out = kog_xsum_in(p, t, layer + 1) + kog_in_copy() * KOG_HIDDEN;
    const int z0 = kog_share_begin(), z1 = kog_share_end();
    // through shared memory: the groups' partials summed, and coalesced adds (a warp's 32
    // consecutive words; from registers a lane's 8 words would spread a warp's adds over 2 KB);
    // the integer partials through the thread's own staging slots (its copies are in)
    float* red = smem + KOG_FFN_RED_OFF;
    if (FIXED && bad) kog_st_relaxed(p->counters + KOG_CNT_OVERFLOW, 1u);
    if (lay.grp < G)
#pragma unroll
        for (int k = 0; k < CPT; ++k)
            if (Lay::has(lay.ch, k)) {
                float4* r4 = reinterpret_cast<float4*>(red + lay.grp * KOG_HIDDEN + (lay.ch + k * KOG_THREADS) * 8);
                r4[0] = make_float4(acc[k][0], acc[k][1], acc[k][2], acc[k][3]);
                r4[1] = make_float4(acc[k][4], acc[k][5], acc[k][6], acc[k][7]);
                if constexpr (FIXED) {
                    longlong2* s2 = reinterpret_cast<longlong2*>(Lay::stage(0, 0)) + 4 * k * KOG_THREADS;
#pragma unroll
                    for (int j = 0; j < 4; ++j) s2[j * KOG_THREADS] = make_longlong2(q[k][2 * j], q[k][2 * j + 1]);
                }
            }
    __syncthreads();
    // (every thread k below the share's size adds a word here, row k, or row k of its rank's
    // half with pairs (share <= HIDDEN / 2): the zeroing's one fence a step relies on it, gemv.cuh)
    for (int i = threadIdx.x; i < KOG_HIDDEN; i += blockDim.x) {
        float v = (i >= z0 && i < z1) ? xs[i] : 0.f;
        long long qi = 0;
#pragma unroll
        for (int g = 0; g < G; ++g) {
            v += red[g * KOG_HIDDEN + i];
            if constexpr (FIXED) qi += *kog_down_q(g, i);
        }
#if KOG_CLUSTER == 1
        if constexpr (FIXED) kog_red_add_u64(out + i, kog_sum_word(p, v, qi));
        else kog_red_add_u64(out + i, kog_sum_word(p, v));
#else
        red[i] = v;                                   // the pair adds it (below)
        if constexpr (FIXED) *kog_down_q(0, i) = qi;   // (read by this thread alone)
#endif
    }
#if KOG_CLUSTER > 1
    // a pair of blocks (one cluster): each has summed its own partial into red[0, H); each
    // adds half of the rows for both -- its own + the other's, read from the other's shared
    // memory (a + b: the same bits whichever block adds) -- so every word gets one part a pair
    kog_cluster_sync();                               // both partials are complete
    const unsigned rank = kog_cluster_rank();
    constexpr int HALF = KOG_HIDDEN / 2;
    for (int i = rank * HALF + threadIdx.x; i < (int)(rank + 1) * HALF; i += blockDim.x) {
        const float v = red[i] + kog_ld_cluster(red + i, rank ^ 1u);
        if constexpr (FIXED)
            kog_red_add_u64(out + i, kog_sum_word(p, v, *kog_down_q(0, i) + kog_ld_cluster(kog_down_q(0, i), rank ^ 1u)));
        else kog_red_add_u64(out + i, kog_sum_word(p, v));
    }
    kog_cluster_sync();                               // the other block has read this one's red
#else                                                 // (a cluster barrier is a block barrier too)
    __syncthreads();                                  // shared memory is free again
#endif
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
