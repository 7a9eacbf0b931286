// ============================================================================================
// lm_head.cuh -- stage final_norm_lm_head: logits[rows] = lm_head @ rmsnorm(x), and this
// block's argmax (lowest index on ties) for the sampler: of the logits when greedy, of the
// draw's scores (logit / T + noise, sampling.cuh) when every id is kept and nothing penalised.
// ============================================================================================
#pragma once
#include "gemv.cuh"
#include "sampling.cuh"

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
    const bool draw = kog_draw_in_lm_head(p);
    const float inv_t = p->inv_temperature;
    const kog_u32 step = (kog_u32)(c.t - (p->prompt_len - 1));        // generated index
    constexpr bool DYN = KOG_DYN_PERMILLE > 0;
    auto ready = [&]() -> float {
#if KOG_TP > 1
        const float s = kog_tp_load_reduced(c, 1, kog_tag(c.t, KOG_N_LAYERS - 1, KOG_STAGE_DOWN));
#else
        if (!DYN && r0 >= r1) return -1.f;
        const float s = kog_load_activation<KOG_HIDDEN, true, KOG_IN_COPIES>(kog_xsum_in(p, c.t, KOG_N_LAYERS), kog_in_parts(KOG_N_LAYERS),
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
        const float key = draw ? kog_draw_score(p, v, inv_t, step, row) : v;
        if (key > best_v || (key == best_v && row < best_i)) { best_v = key; best_i = row; }
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
