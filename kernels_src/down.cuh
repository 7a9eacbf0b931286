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
KOG_DEVICE void kog_down_parts(const KogParams* p, int layer, int t, int u0, int n_static, int n) {
    using Lay = KogDownLayout;
    constexpr int G = Lay::G, D = Lay::D, CPT = Lay::CPT;
    const Lay lay;
    float* smem = kog_smem();
    const float* xs = smem;
    const float* acts = smem + KOG_FFN_ACT_OFF;
    const int mine = lay.grp < G ? (n - lay.grp + G - 1) / G : 0;       // slots grp, grp + G, ...
    auto issue = [&](int i) { kog_down_issue(p, layer, u0, n_static, mine, i); };
    float acc[CPT][8];
#pragma unroll
    for (int k = 0; k < CPT; ++k)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[k][e] = 0.f;
    if (!kog_down_prefetched(n_static))                // (else gate_up issued them)
#pragma unroll
        for (int i = 0; i < D - 1; ++i) issue(i);
    for (int i = 0; i < mine; ++i) {
        issue(i + D - 1);
        kog_copy16_wait_groups<D - 1>();              // row i is in
        const float a = acts[lay.grp + i * G];
#pragma unroll
        for (int k = 0; k < CPT; ++k)
            if (Lay::has(lay.ch, k)) kog_axpy8(*Lay::stage(i, k), a, acc[k]);
    }
    kog_copy16_wait_groups<0>();
    // the block's part of in(t, l + 1): its partial of every row, plus x for its share's rows
    kog_u64* out = kog_xsum_in(p, t, layer + 1) + kog_in_copy() * KOG_HIDDEN;
    const int z0 = kog_share_begin(), z1 = kog_share_end();
    // through shared memory: the groups' partials summed, and coalesced adds (a warp's 32
    // consecutive words; from registers a lane's 8 words would spread a warp's adds over 2 KB)
    float* red = smem + KOG_FFN_RED_OFF;
    if (lay.grp < G)
#pragma unroll
        for (int k = 0; k < CPT; ++k)
            if (Lay::has(lay.ch, k)) {
                float4* r4 = reinterpret_cast<float4*>(red + lay.grp * KOG_HIDDEN + (lay.ch + k * KOG_THREADS) * 8);
                r4[0] = make_float4(acc[k][0], acc[k][1], acc[k][2], acc[k][3]);
                r4[1] = make_float4(acc[k][4], acc[k][5], acc[k][6], acc[k][7]);
            }
    __syncthreads();
    // (every thread k below the share's size adds a word here, row k, or row k of its rank's
    // half with pairs (share <= HIDDEN / 2): the zeroing's one fence a step relies on it, gemv.cuh)
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
