// ============================================================================================
// o_proj.cuh -- stage o_proj_residual: x += wo @ attention output.
// One GPU: split over the kv head groups (o_proj's reduction over q_dim). Item (g, s) waits only
// for head group g's attention units: it merges their chunk partials into the group's output
// itself (kog_attn_combine: no combiner unit, no attn_out round trip), multiplies it by columns
// [g * G * HD, (g + 1) * G * HD) of row slice s of wo and adds the products into the residual
// sum mid(t, l) (sync.cuh), where attn_norm_qkv has added the x entering the layer. Items
// spread over the blocks from block 0 up (KOG_OPROJ_SPARE: only below the attention units' blocks
// while those are at most half the grid); attention units go from the top of the grid down and
// wait for no item (a block runs its own units before its item).
// Tensor parallel: every rank's heads give a partial of every row, all-reduced (kccl.cuh).
// ============================================================================================
#pragma once
#include "gemv.cuh"
#include "attention.cuh"

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
#if KOG_ZERO_EARLY
    // the next position's sums zeroed here, not in gate_up's wait: SmolLM2 +4.5 % when the
    // fence ran in every layer's wait, +1.5 % with one fence a step (build_plan.py)
    kog_xsum_zero_next(c, layer);
#endif
    constexpr int GHD = KOG_GQA * KOG_HEAD_DIM;     // columns of one head group
    constexpr int RU = 4;                           // rows per GEMV unit (a warp tile spans them)
    constexpr int NU = KOG_HIDDEN / RU;
    static_assert(KOG_HIDDEN % RU == 0, "o_proj: whole units of rows");
    static_assert(GHD * (3 * KOG_ATTN_COMBINE_S - 2) <= KOG_SMEM_FLOATS, "o_proj: xs and the combine's stash fit");
#ifndef KOG_OPROJ_SPARE
#error "KOG_OPROJ_SPARE comes from kernels.py (model_defines)"
#endif
#if KOG_OPROJ_SPARE
    // While the attention units take at most half the grid, the blocks that ran one (the top
    // n_units blocks) take no item: each would poll its group's partials a round trip after its
    // own unit ended, and in the trace the layer's last o_proj item was always such a block.
    const int n_units = KOG_N_KV * kog_attn_n_chunks(c.t + 1, kog_attn_chunk_len_now(c));
    const int item_blocks = 2 * n_units <= (int)gridDim.x ? (int)gridDim.x - n_units : (int)gridDim.x;
#else
    const int item_blocks = gridDim.x;
#endif
    const int n_slices = max(1, item_blocks / KOG_N_KV);
    kog_u64* sum = kog_xsum_mid(p, c.t, layer);
    for (int item = blockIdx.x; item < KOG_N_KV * n_slices; item += item_blocks) {
        const int g = item % KOG_N_KV, sl = item / KOG_N_KV;
        const int u0 = (int)((long long)sl * NU / n_slices), u1 = (int)((long long)(sl + 1) * NU / n_slices);
        auto ready = [&]() -> float {
            if (u0 >= u1) return -1.f;
            const int n_pos = c.t + 1, chunk = kog_attn_chunk_len_now(c);
            // the debug dump: the group's item holding row 0 (slice 0 is empty when a group has
            // fewer units of rows than slices)
            float* dbg = u0 == 0 ? kog_debug_row(c) : nullptr;
            __syncthreads();                        // xs and the stash are free
            kog_attn_combine(p, g, kog_attn_n_chunks(n_pos, chunk), nullptr, nullptr, attn_tag,
                             c.smem + GHD, [&](int i, float v) {
                c.smem[i] = v;
                if (dbg != nullptr) dbg[KOG_DBG_ATTENTION + (kog_u64)layer * KOG_DBG_LAYER + g * GHD + i] = v;
            });
            __syncthreads();                        // xs is published
            kog_prof(c, layer * 16 + 7);
            return 1.f;
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
