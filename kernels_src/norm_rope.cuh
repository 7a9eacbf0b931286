// ============================================================================================
// norm_rope.cuh -- stage attn_norm_qkv, and the per-head qk-norm + RoPE the attention stage
// applies on read.
//
// attn_norm_qkv: qkv = wqkv @ rmsnorm(x) (+ bqkv), x the residual sum in(t, l) on one GPU
// (sync.cuh). The attn_norm gamma is folded into wqkv,
// so a block only needs sum(x^2), which it computes itself from x in shared memory. Rows are
// split evenly over all blocks (whole heads per block would leave most of the grid idle: 48
// heads of Llama-3.2-1B against 132 multiprocessors), so the per-head work (qwen3 q/k RMSNorm,
// half-split RoPE, KV append) is done by the attention stage, which holds whole heads.
// ============================================================================================
#pragma once
#include "gemv.cuh"

// Returns true when the generation is over (seen at layer 0: the sampler set the stop flag).
KOG_DEVICE bool kog_stage_attn_norm_qkv(const KogCtx& c, int layer) {
    const KogParams* p = c.p;
    float* xs = KOG_TP > 1 ? c.x_full : c.smem;   // tensor parallel: x is kept in x_full
    const bool first = layer == 0;
#if KOG_TP > 1
    const kog_u32 x_tag = first ? kog_tag(c.t, 0, KOG_STAGE_EMBED)
                                : kog_tag(c.t, layer - 1, KOG_STAGE_DOWN);
#endif
    const kog_u32 out_tag = kog_tag(c.t, layer, KOG_STAGE_QKV);
    const int r0 = c.part[0], r1 = c.part[1];
    const float* bias = KOG_QKV_BIAS ? p->bqkv + (kog_u64)layer * KOG_QKV_DIM : nullptr;
    kog_u64* out = p->qkv;
    bool stop = false;
    kog_prof(c, layer * 16 + 0);
    auto ready = [&]() -> float {
        if (first) {                           // the next token (or the end) is decided
            stop = kog_wait_counter_read_flag(kog_counter(c, KOG_CNT_TOK), (kog_u32)(c.t + 1),
                                              kog_counter(c, KOG_CNT_STOP),
                                              reinterpret_cast<kog_u32*>(c.scratch + KOG_SLOT_FLAG)) != 0u;
            if (stop) return -1.f;
        }
#if KOG_TP > 1
        const float s = first ? kog_load_activation<KOG_HIDDEN>(p->x, x_tag, xs, c.scratch, true)
                              : kog_tp_load_reduced(c, 1, x_tag);
#else
        // every block reads x: it adds its share's rows to mid(t, l) (the x entering the layer)
        const float s = kog_load_activation<KOG_HIDDEN, true, KOG_IN_COPIES>(kog_xsum_in(p, c.t, layer), kog_in_parts(layer),
                                                              xs, c.scratch, true);
        kog_u64* mid = kog_xsum_mid(p, c.t, layer);
        float* dbg = kog_debug_row(c);
        for (int i = kog_share_begin() + threadIdx.x; i < kog_share_end(); i += blockDim.x) {
            kog_red_add_u64(mid + i, kog_sum_word(p, xs[i]));
            if (dbg != nullptr && !first) dbg[KOG_DBG_DOWN + (kog_u64)(layer - 1) * KOG_DBG_LAYER + i] = xs[i];
        }
        if (r0 >= r1) return -1.f;
#endif
        kog_prof(c, layer * 16 + 1);
        return s;
    };
    // the bias of the warp's first row is loaded before the wait: read in the epilogue, its
    // round trip would hold the row's store (later rows, few, still read theirs there)
    const int first_row = r0 + (int)threadIdx.x / KOG_WARP;
    float first_bias = 0.f;
    if (KOG_QKV_BIAS && threadIdx.x % KOG_WARP == 0 && first_row < r1) first_bias = bias[first_row];
    auto epi = [&](int row, float (&acc)[1], float scale) {
        if (threadIdx.x % KOG_WARP == 0) {
            float v = acc[0] * scale;
            if (KOG_QKV_BIAS) v += row == first_row ? first_bias : bias[row];
            kog_st_tagged(out + row, v, out_tag);
        }
    };
    kog_gemv<KOG_HIDDEN, 1, false, KOG_HIDDEN, KOG_QKV_EARLY>(
        p->wqkv + (kog_u64)layer * KOG_QKV_DIM * KOG_HIDDEN, r0, r1, xs, c, ready, epi);
    kog_prof_end(c, layer * 16 + 2);
    return stop;
}

// One warp: v (KOG_HEAD_DIM floats, shared) <- RoPE(gamma ? rmsnorm(v) * gamma : v), with
// rope = [cos; sin] of the position (KOG_HEAD_DIM / 2 each, shared memory) and gamma (shared
// memory; global in the attention's one-q-head-a-kv-head fallback).
KOG_DEVICE void kog_head_norm_rope(float* v, const float* gamma, const float* rope) {
    constexpr int HD = KOG_HEAD_DIM, HALF = KOG_HEAD_DIM / 2;
    const int lane = threadIdx.x % KOG_WARP;
    if (gamma != nullptr) {
        float ss = 0.f;
        for (int d = lane; d < HD; d += KOG_WARP) ss = fmaf(v[d], v[d], ss);
        ss = kog_warp_sum(ss);
        const float inv = rsqrtf(ss / (float)HD + KOG_EPS);
        for (int d = lane; d < HD; d += KOG_WARP) v[d] = v[d] * inv * gamma[d];
        kog_syncwarp();
    }
    for (int i = lane; i < HALF; i += KOG_WARP) {
        const float x1 = v[i], x2 = v[i + HALF], co = rope[i], si = rope[i + HALF];
        v[i] = x1 * co - x2 * si;
        v[i + HALF] = x2 * co + x1 * si;
    }
    kog_syncwarp();
}
