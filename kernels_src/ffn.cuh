// ============================================================================================
// ffn.cuh -- stage ffn_residual (one GPU): x += w_down @ (silu(gate . n) * (up . n)),
// n = rmsnorm(x), in ONE grid-wide hop.
//
// A block owns FFN columns [u0, u1) (the partition's gate_up units, all static). It computes
// their activations into shared memory (gate/up rows interleaved, kog_gemv), then its partial
// of down over those columns -- w_down is stored transposed on the GPU, (L, f, h), so column j
// of down is a contiguous row -- and adds the partial (h floats) into the layer's fp32 sum
// x_ffn with vector reductions in L2. Its last act is a release add to KOG_CNT_FFN[layer].
// Consumers of x after the layer (next qkv, next o_proj's old rows, LM head, the sampler in the
// prompt) read the tagged x @ o(t, l) plus x_ffn once the counter has every producer
// (kog_load_residual). The reduction order in L2 varies run to run: results are not
// bit-reproducible (SYNC.md).
//
// The weights need no input: the stage first copies its first KOG_DOWN_STAGE_ROWS rows of
// w_down^T to shared memory (cp.async, no registers: the copy streams while the block waits
// for x and runs gate_up), and has the first loads of the remaining rows in flight before act
// is complete.
//
// x_ffn has two copies (position parity). A producer zeroes its rows [u0 h / f, u1 h / f) of
// the other parity's copy for its layer before its release: the readers of that copy ran at
// t - 1 (done before TOK(t + 1) was released) and the next adders run at t + 1 (after TOK(t + 2),
// which follows every producer's release of FFN(t, L - 1)).
// ============================================================================================
#pragma once
#include "gemv.cuh"

#define KOG_DOWN_CHUNKS (KOG_HIDDEN / 8)                  // 16-byte vectors per row of w_down^T
#define KOG_DOWN_GROUPS (KOG_THREADS / KOG_DOWN_CHUNKS)   // thread groups splitting the columns
#define KOG_DOWN_INFLIGHT 8                               // loads in flight per thread
#ifndef KOG_DOWN_STAGE_ROWS
#define KOG_DOWN_STAGE_ROWS 0     // down rows copied to shared memory before the wait (build_plan)
#endif
#if KOG_TP == 1
static_assert(KOG_DOWN_GROUPS >= 1, "a thread per 8 hidden values");
static_assert((KOG_DOWN_GROUPS - 1) * KOG_HIDDEN <= KOG_SMEM_FLOATS, "group partials fit");

KOG_DEVICE void kog_stage_ffn_residual(const KogCtx& c, int layer) {
    kog_prof(c, layer * 16 + 9 + 0);
    const KogParams* p = c.p;
    const int u0 = c.part[4], u1 = c.part[5];
    if (u0 >= u1) return;                                   // no columns: not a producer
    float* dbg = kog_debug_row(c);
    float* act = c.smem + KOG_HIDDEN;                       // this block's activations
    if (u1 - u0 > KOG_SMEM_FLOATS - KOG_HIDDEN) kog_trap(); // build_plan sizes it
    constexpr int CH = KOG_DOWN_CHUNKS, G = KOG_DOWN_GROUPS, NL = KOG_DOWN_INFLIGHT;
    const int n = u1 - u0;
    const int staged = n < KOG_DOWN_STAGE_ROWS ? n : KOG_DOWN_STAGE_ROWS;
    const kog_vec4* Wd4 = reinterpret_cast<const kog_vec4*>(
        p->w_down + ((kog_u64)layer * KOG_FFN + u0) * KOG_HIDDEN);
    kog_vec4* stage4 = reinterpret_cast<kog_vec4*>(c.x_full);   // after x_own (one GPU)
    for (int i = threadIdx.x; i < staged * CH; i += blockDim.x) kog_copy16(stage4 + i, Wd4 + i);
    auto ready = [&]() -> float {
        const float s = kog_load_activation<KOG_HIDDEN>(p->x, kog_tag(c.t, layer, KOG_STAGE_O),
                                                        c.smem, c.scratch, true);
        kog_prof(c, layer * 16 + 10);
        return s;
    };
    auto epi = [&](int j, float (&acc)[2], float scale) {
        if (threadIdx.x % KOG_WARP == 0) {
            const float g = acc[0] * scale, u = acc[1] * scale;
            const float a = g / (1.f + expf(-g)) * u;
            act[j - u0] = a;
            if (dbg != nullptr) dbg[KOG_DBG_GATE_UP + (kog_u64)layer * KOG_DBG_LAYER + j] = a;
        }
    };
    kog_gemv<KOG_HIDDEN, 2>(p->w_gate_up + (kog_u64)layer * 2 * KOG_FFN * KOG_HIDDEN, u0, u1,
                            c.smem, c, ready, epi);
    kog_prof_end(c, layer * 16 + 9 + 2);

    // ---- down: partial[i] = sum_{j in [u0, u1)} w_down^T[j][i] * act[j] ----
    kog_prof(c, layer * 16 + 12 + 0);
    const int grp = threadIdx.x / CH, ch = threadIdx.x % CH;
    const bool active = grp < G;
    const kog_vec4* Wd = Wd4 + ch;
    kog_vec4 w[NL];
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = 0.f;
    // rows [staged, n) from global memory: the first loads go out before act is complete
#pragma unroll
    for (int k = 0; k < NL; ++k) {
        const int j = staged + grp + k * G;
        if (active && j < n) w[k] = kog_ld_stream(Wd + (kog_u64)j * CH);
    }
    kog_copy16_wait_all();                                  // this thread's staged copies
    __syncthreads();                                        // act[] and the staged rows complete
    kog_prof(c, layer * 16 + 12 + 1);
    if (active)
        for (int j = grp; j < staged; j += G) kog_axpy8(stage4[j * CH + ch], act[j], acc);
    for (int j0 = staged + grp; j0 < n; j0 += NL * G) {
#pragma unroll
        for (int k = 0; k < NL; ++k) {
            const int j = j0 + k * G;
            if (active && j < n) {
                kog_axpy8(w[k], act[j], acc);
                const int jn = j + NL * G;
                if (jn < n) w[k] = kog_ld_stream(Wd + (kog_u64)jn * CH);
            }
        }
    }
    // groups 1.. hand their partials to group 0 through shared memory (x is no longer read)
    float* red = c.smem;
    __syncthreads();
    if (active && grp > 0) {
#pragma unroll
        for (int e = 0; e < 8; ++e) red[(grp - 1) * KOG_HIDDEN + ch * 8 + e] = acc[e];
    }
    __syncthreads();
    float* sum = kog_ffn_sum(c, c.t, layer);
    if (grp == 0) {
        for (int g = 1; g < G; ++g)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] += red[(g - 1) * KOG_HIDDEN + ch * 8 + e];
        kog_red_add4(sum + ch * 8, acc[0], acc[1], acc[2], acc[3]);
        kog_red_add4(sum + ch * 8 + 4, acc[4], acc[5], acc[6], acc[7]);
    }
    // zero this block's rows of the other parity's copy (the next position adds into it)
    float* next = kog_ffn_sum(c, c.t + 1, layer);
    const int z0 = (int)((kog_u64)u0 * KOG_HIDDEN / KOG_FFN), z1 = (int)((kog_u64)u1 * KOG_HIDDEN / KOG_FFN);
    for (int i = z0 + (int)threadIdx.x; i < z1; i += blockDim.x) next[i] = 0.f;
    kog_signal_counter(kog_counter(c, KOG_CNT_FFN + layer));   // barrier, then release add
    kog_prof_end(c, layer * 16 + 12 + 2);
    if (dbg != nullptr && blockIdx.x == 0) {               // the layer's output, for the dumps
        kog_load_residual(c, layer, c.smem, false);
        for (int i = threadIdx.x; i < KOG_HIDDEN; i += blockDim.x)
            dbg[KOG_DBG_DOWN + (kog_u64)layer * KOG_DBG_LAYER + i] = c.smem[i];
        __syncthreads();
    }
}
#endif
