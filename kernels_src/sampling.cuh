// ============================================================================================
// sampling.cuh -- stages sample and stop_check (one block: block 0), plus the embedding
// lookup of the next token.
//
// The algorithm is kogcupy/reference/sampling.py's, step for step: repetition penalty over the distinct
// ids of prompt + generated (per-step stamps make "distinct" cheap) -> greedy argmax (lowest
// id on ties; without a penalty it only reduces the per-block partial argmax the LM head
// stage left) -> logits / T -> top_k -> softmax -> top_p -> min_p -> the draw: the kept id
// with the largest logit / T + g(seed, step, id), g a Gumbel variate from Philox4x32-10.
// With no filter and no penalty every id is kept, so the LM head's blocks score their own
// rows as they write them and this stage reduces their partials like the greedy argmax.
//
// No sort: every "prefix of the descending order" is a cut (key, id) -- token i is kept when
// its order key is above `key`, or equal to it with i <= id (ties in logit go to the lower id,
// as in sampling.descending_order). A cut is found by a 3-pass radix select over the 32-bit
// order-preserving key of the logit (11 + 11 + 10 bits, shared-memory histograms of counts or
// of unnormalised probability mass), then a scan for the id among equal keys.
// ============================================================================================
#pragma once
#include "gemv.cuh"

// Philox4x32-10: the four output words of counter (c0, c1, 0, 0) under key (k0, k1).
KOG_DEVICE uint4 kog_philox4(kog_u32 k0, kog_u32 k1, kog_u32 c0, kog_u32 c1) {
    const kog_u32 M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
    kog_u32 c2 = 0u, c3 = 0u;
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        if (r) { k0 += W0; k1 += W1; }
        const kog_u32 hi0 = __umulhi(M0, c0), lo0 = M0 * c0;
        const kog_u32 hi1 = __umulhi(M1, c2), lo1 = M1 * c2;
        const kog_u32 n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    }
    return make_uint4(c0, c1, c2, c3);
}

// The draw's score of token `id` at generated index `step`: logit * (1 / T) + g, multiply and
// add rounded apart (as numpy does), g = -log(-log(u)), u = ((w >> 9) + 0.5) * 2^-23 from word
// id & 3 of counter (step, id >> 2) under the seed (reference/sampling.py, perturbed_scores).
__device__ __noinline__ float kog_draw_score(const KogParams* p, float logit, float inv_t, kog_u32 step, int id) {
    const uint4 w = kog_philox4(p->seed_lo, p->seed_hi, step, (kog_u32)id >> 2);
    const int j = id & 3;
    const kog_u32 x = j == 0 ? w.x : (j == 1 ? w.y : (j == 2 ? w.z : w.w));
    const float u = ((float)(x >> 9) + 0.5f) * (1.0f / 8388608.0f);
    return __fadd_rn(__fmul_rn(logit, inv_t), -logf(-logf(u)));
}

// Every id kept and no penalty: the LM head's blocks draw (see the file comment). Outside the
// generation (prompt logits only) there is nothing to draw.
KOG_DEVICE bool kog_draw_in_lm_head(const KogParams* p) {
    return p->temperature > 0.f && !p->all_logits && (p->top_k <= 0 || p->top_k >= KOG_VOCAB) &&
           p->top_p >= 1.f && p->min_p <= 0.f && p->repetition_penalty == 1.f;
}

// Order-preserving unsigned key of a float (larger float -> larger key).
KOG_DEVICE kog_u32 kog_float_key(float f) {
    const kog_u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
KOG_DEVICE float kog_key_float(kog_u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

template <class T>
KOG_DEVICE T kog_block_prefix_incl(T v, float* scratch, T& total) {
    const int lane = threadIdx.x % KOG_WARP, warp = threadIdx.x / KOG_WARP;
    const int n_warps = blockDim.x / KOG_WARP;
#pragma unroll
    for (int d = 1; d < KOG_WARP; d <<= 1) {
        const T o = kog_shfl_up(v, d);
        if (lane >= d) v += o;
    }
    T* sc = reinterpret_cast<T*>(scratch);
    __syncthreads();
    if (lane == KOG_WARP - 1) sc[warp] = v;
    __syncthreads();
    T before = 0, tot = 0;
    for (int w = 0; w < n_warps; ++w) {
        const T x = sc[w];
        if (w < warp) before += x;
        tot += x;
    }
    total = tot;
    return v + before;
}

// Calls fn(i, logit) for each logit of this thread's share of the vocabulary (block 0 walks all
// of it in every pass). The logits are staged through shared memory by asynchronous 16-byte
// copies, KOG_SAMPLE_SLOTS per thread and buffer, two buffers: a pass over a 128k vocabulary
// waits for ~16 L2 round trips instead of one per 512 logits, and holds no registers for the
// loads in flight (the kernel is at its register ceiling). Each thread reads back only the
// slots it copied, so no barrier is needed. `logits` is 16-byte aligned; the staging buffers
// sit in `stage` (2 x 4 x KOG_THREADS x KOG_SAMPLE_SLOTS floats of shared memory).
#define KOG_SAMPLE_HIST_FLOATS (2048 * 2 + 8)                  // kog_select's histograms
#define KOG_SAMPLE_SLOTS_FIT ((KOG_SMEM_FLOATS - KOG_SAMPLE_HIST_FLOATS - 8) / (2 * 4 * KOG_THREADS))
#define KOG_SAMPLE_SLOTS (KOG_SAMPLE_SLOTS_FIT < 4 ? KOG_SAMPLE_SLOTS_FIT : 4)
#define KOG_SAMPLE_SMEM_FLOATS (KOG_SAMPLE_HIST_FLOATS + 8 + 2 * 4 * KOG_THREADS)
template <class F>
KOG_DEVICE void kog_for_logits(const float* logits, float* stage, F fn) {
    constexpr int V4 = KOG_VOCAB / 4, S = KOG_SAMPLE_SLOTS, CH = S * KOG_THREADS;   // float4s a chunk
    constexpr int NCH = (V4 + CH - 1) / CH;
    static_assert(S >= 1, "shared memory for the sampler's staging buffers");
    const float4* l4 = reinterpret_cast<const float4*>(logits);
    float4* buf = reinterpret_cast<float4*>(stage);
    const int tid = threadIdx.x;
    auto issue = [&](int ch) {
        if (ch < NCH) {
#pragma unroll
            for (int k = 0; k < S; ++k) {
                const int i4 = ch * CH + k * KOG_THREADS + tid;
                if (i4 < V4) kog_copy16(buf + (ch & 1) * CH + k * KOG_THREADS + tid, l4 + i4);
            }
        }
        kog_copy16_commit();
    };
    issue(0);
    for (int ch = 0; ch < NCH; ++ch) {
        issue(ch + 1);
        kog_copy16_wait_groups<1>();
#pragma unroll 1
        for (int k = 0; k < S; ++k) {                  // (not unrolled: fn's code once, not S times)
            const int i4 = ch * CH + k * KOG_THREADS + tid;
            if (i4 < V4) {
                const float4 v = buf[(ch & 1) * CH + k * KOG_THREADS + tid];
                fn(4 * i4, v.x); fn(4 * i4 + 1, v.y); fn(4 * i4 + 2, v.z); fn(4 * i4 + 3, v.w);
            }
        }
    }
    kog_copy16_wait_groups<0>();
    for (int i = 4 * V4 + tid; i < KOG_VOCAB; i += blockDim.x) fn(i, kog_ld_cg(logits + i));
}

struct KogSampler {
    const float* logits;   // (V,) after the repetition penalty
    float lmax;            // max logit
    float inv_t;           // 1 / temperature
    float min_w;           // min_p (kept when weight >= min_w), 0 -> off
    kog_u32 cut_key;       // current prefix of the descending order (see file comment)
    int cut_id;
    float* stage;          // kog_for_logits' staging buffers (shared memory)
};
KOG_DEVICE float kog_weight(const KogSampler& s, float l) { return expf((l - s.lmax) * s.inv_t); }
KOG_DEVICE bool kog_kept(const KogSampler& s, int i, float l, kog_u32 k) {
    if (!(k > s.cut_key || (k == s.cut_key && i <= s.cut_id))) return false;
    return s.min_w <= 0.f || kog_weight(s, l) >= s.min_w;
}

KOG_DEVICE float kog_kept_mass(const KogSampler& s, float* scratch) {
    float m = 0.f;
    kog_for_logits(s.logits, s.stage, [&](int i, float l) {
        if (kog_kept(s, i, l, kog_float_key(l))) m += kog_weight(s, l);
    });
    return kog_block_sum(m, scratch);
}

// Narrows s's cut to the first position of the descending order where the running count
// reaches target_c (count_mode), or the running mass reaches target_m (>=).
// Returns the token id at that position.
KOG_DEVICE int kog_select(KogSampler& s, bool count_mode, int target_c, float target_m,
                          float* sm, float* scratch) {
    float* hm = sm;
    int* hc = reinterpret_cast<int*>(sm + 2048);
    int* sel = reinterpret_cast<int*>(sm + 4096);
    float* sel_m = sm + 4096 + 4;
    const int tid = threadIdx.x, bd = blockDim.x;
    kog_u32 prefix = 0u, mask = 0u;
    int above_c = 0, n_eq = 0;
    float above_m = 0.f;
    for (int pass = 0; pass < 3; ++pass) {
        const int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
        const int nb = pass == 2 ? 1024 : 2048;
        const int bpt = nb / bd;
        for (int b = tid; b < nb; b += bd) { hm[b] = 0.f; hc[b] = 0; }
        if (tid == 0) { sel[0] = -1; sel[1] = nb; }
        __syncthreads();
        kog_for_logits(s.logits, s.stage, [&](int i, float l) {
            const kog_u32 k = kog_float_key(l);
            if ((k & mask) != prefix || !kog_kept(s, i, l, k)) return;
            const int b = (int)((k >> shift) & (kog_u32)(nb - 1));
            atomicAdd(hc + b, 1);
            if (!count_mode) atomicAdd(hm + b, kog_weight(s, l));
        });
        __syncthreads();
        int lc = 0;
        float lm = 0.f;
        for (int b = tid * bpt; b < (tid + 1) * bpt; ++b) { lc += hc[b]; lm += hm[b]; }
        int tot_c;
        float tot_m;
        const int pc = kog_block_prefix_incl(lc, scratch, tot_c);
        const float pm = kog_block_prefix_incl(lm, scratch, tot_m);
        const int run_c0 = above_c + (tot_c - pc);          // bins above this thread's group
        const float run_m0 = above_m + (tot_m - pm);
        int run_c = run_c0;
        float run_m = run_m0;
        for (int b = (tid + 1) * bpt - 1; b >= tid * bpt; --b) {
            const int n = hc[b];
            const float m = hm[b];
            if (n > 0) {
                atomicMin(sel + 1, b);
                const bool hit = count_mode ? (run_c < target_c && run_c + n >= target_c)
                                            : (run_m < target_m && run_m + m >= target_m);
                if (hit) atomicMax(sel, b);
            }
            run_c += n;
            run_m += m;
        }
        __syncthreads();
        const int bsel = sel[0] >= 0 ? sel[0] : sel[1];     // no hit: rounding; last kept bin
        if (bsel / bpt == tid) {
            run_c = run_c0;
            run_m = run_m0;
            for (int b = (tid + 1) * bpt - 1; b > bsel; --b) { run_c += hc[b]; run_m += hm[b]; }
            sel[2] = run_c;
            *sel_m = run_m;
        }
        __syncthreads();
        above_c = sel[2];
        above_m = *sel_m;
        n_eq = hc[bsel];
        prefix |= (kog_u32)bsel << shift;
        mask |= (kog_u32)(nb - 1) << shift;
        __syncthreads();
    }
    // Ties on the key: the j-th kept token (by id) among those equal to it.
    const kog_u32 v = prefix;
    int j;
    if (count_mode) {
        j = target_c - above_c;
    } else {
        const float wv = kog_weight(s, kog_key_float(v));
        const float q = (target_m - above_m) / wv;
        j = (int)ceilf(q);
    }
    j = max(1, min(j, n_eq));
    if (tid == 0) sel[0] = -1;
    __syncthreads();
    if (j == n_eq) {                                     // the last kept tie: largest id
        kog_for_logits(s.logits, s.stage, [&](int i, float l) {
            const kog_u32 k = kog_float_key(l);
            if (k == v && kog_kept(s, i, l, k)) atomicMax(sel, i);
        });
    } else {
        int base = 0;
        for (int i0 = 0; i0 < KOG_VOCAB && base < j; i0 += bd) {
            const int i = i0 + tid;
            bool f = false;
            if (i < KOG_VOCAB) {
                const float l = kog_ld_cg(s.logits + i);
                const kog_u32 k = kog_float_key(l);
                f = k == v && kog_kept(s, i, l, k);
            }
            int total;
            const int pre = kog_block_prefix_incl(f ? 1 : 0, scratch, total);
            if (f && base + pre == j) sel[0] = i;
            base += total;
        }
    }
    __syncthreads();
    const int id = sel[0];
    __syncthreads();
    s.cut_key = v;
    s.cut_id = id;
    return id;
}

// The sampled token for generated index g_index at position c.t (block 0, all threads).
KOG_DEVICE int kog_sample_token(const KogCtx& c, int g_index) {
    const KogParams* p = c.p;
    float* logits = p->logits;
    float* stage = c.smem + KOG_SAMPLE_HIST_FLOATS + 8;   // after kog_select's histograms
    const int tid = threadIdx.x, bd = blockDim.x;
    const float pen = p->repetition_penalty;
    if (pen != 1.f) {
        const kog_u32 stamp = (kog_u32)g_index + 1u;
        for (int i = tid; i <= c.t; i += bd) {
            const int id = kog_ld_cg_int(p->tokens + i);
            if (atomicExch(p->rep_stamp + id, stamp) != stamp) {
                const float l = kog_ld_cg(logits + id);
                logits[id] = l > 0.f ? l / pen : l * pen;
            }
        }
        __syncthreads();
    }
    float bv = KOG_NEG_INF, v_unused;
    int bi = KOG_INT_MAX;
    auto better = [&](int i, float v) {
        if (v > bv || (v == bv && i < bi)) { bv = v; bi = i; }
    };
    if (p->temperature == 0.f ? pen == 1.f : kog_draw_in_lm_head(p)) {
        // reduce the LM head's per-block partials (greedy: logits; drawing: scores) of every
        // rank's blocks; both loads issued before the check (one L2 round trip)
        for (int b = tid; b < KOG_TP * (int)gridDim.x; b += bd) {
            const int i = kog_ld_cg_int(p->lm_part_idx + b);
            const float v = kog_ld_cg(p->lm_part_val + b);
            if (i >= 0) better(i, v);                                   // (no rows: host -1)
        }
        return kog_block_argmax(bv, bi, c.scratch, v_unused);
    }
    if (p->temperature == 0.f) {                                        // greedy, penalised
        kog_for_logits(logits, stage, better);
        return kog_block_argmax(bv, bi, c.scratch, v_unused);
    }
    KogSampler s;
    s.logits = logits;
    s.lmax = 0.f;
    s.inv_t = 1.f / p->temperature;
    s.min_w = 0.f;
    s.cut_key = 0u;
    s.cut_id = KOG_INT_MAX;
    s.stage = stage;
    if (p->top_p < 1.f || p->min_p > 0.f) {           // the filters that weigh tokens
        float lmax = KOG_NEG_INF;
        kog_for_logits(logits, stage, [&](int, float l) { lmax = fmaxf(lmax, l); });
        s.lmax = kog_block_max(lmax, c.scratch);
    }
    if (p->top_k > 0 && p->top_k < KOG_VOCAB) kog_select(s, true, p->top_k, 0.f, c.smem, c.scratch);
    if (p->top_p < 1.f) {
        const float z = kog_kept_mass(s, c.scratch);
        kog_select(s, false, 0, p->top_p * z, c.smem, c.scratch);
    }
    if (p->min_p > 0.f) s.min_w = p->min_p;
    // the draw: the kept id of the largest score (one pass; the noise only for kept ids)
    kog_for_logits(logits, stage, [&](int i, float l) {
        if (kog_kept(s, i, l, kog_float_key(l))) better(i, kog_draw_score(p, l, s.inv_t, (kog_u32)g_index, i));
    });
    return kog_block_argmax(bv, bi, c.scratch, v_unused);
}

// x <- embed[token] (block 0), dumped as stage "embed" of position `pos`.
KOG_DEVICE void kog_embed(const KogCtx& c, int token, int pos) {
    const KogParams* p = c.p;
    const kog_u16* row = p->embed + (kog_u64)token * KOG_HIDDEN;
    const kog_u32 tag = kog_tag(pos, 0, KOG_STAGE_EMBED);
    float* dbg = (KOG_HOOKS && p->debug != nullptr && pos < p->debug_npos)
                     ? p->debug + (kog_u64)pos * p->debug_stride : nullptr;
    for (int i = threadIdx.x; i < KOG_HIDDEN; i += blockDim.x) {
        const float v = kog_w_to_f32(row[i]);
#if KOG_TP > 1
        kog_st_tagged(p->x + i, v, tag);
#else
        kog_red_add_u64(kog_xsum_in(p, pos, 0) + i, kog_sum_word(p, v));   // in(pos, 0): one part
#endif
        if (dbg != nullptr) dbg[KOG_DBG_EMBED + i] = v;
    }
}

// Stage sample + stop_check for position c.t (block 0). Publishes the token to the host,
// writes x for the next position, and signals KOG_CNT_TOK (or sets the stop flag).
KOG_DEVICE void kog_stage_sample(const KogCtx& c, bool lm_ran, int lm_steps) {
    const KogParams* p = c.p;
    const int t = c.t;
    const int last_prompt = p->prompt_len - 1;
    const bool generating = t >= last_prompt && !p->all_logits;
    const int g = t - last_prompt;                        // generated index (when generating)
    kog_u32* slot = reinterpret_cast<kog_u32*>(c.scratch + KOG_SLOT_FLAG + 1);
    kog_prof(c, KOG_N_LAYERS * 16 + 3);
    // The host's cancel flag is read before the wait: a PCIe round trip off the critical path.
    // Tensor parallel: rank 0's LM head forwarded it to every rank's KOG_CNT_CANCEL.
#if KOG_TP > 1
    kog_u32 cancel = 0u;
#else
    const kog_u32 cancel = (generating && threadIdx.x == 0) ? kog_ld_relaxed_system(p->host_ctl + 2) : 0u;
    const kog_u32 overflow = (generating && threadIdx.x == 0) ? kog_ld_cg_u32(kog_counter(c, KOG_CNT_OVERFLOW)) : 0u;
#endif
    // The EOS ids (at most 64, monokernel.py) too: thread e holds the e-th.
    const int eos = (generating && (int)threadIdx.x < p->n_eos) ? p->eos_ids[threadIdx.x] : -1;
    if (!lm_ran) {                                        // inside the prompt: x is final
#if KOG_TP > 1
        kog_tp_load_reduced(c, 1, kog_tag(t, KOG_N_LAYERS - 1, KOG_STAGE_DOWN));
#else
        kog_load_activation<KOG_HIDDEN, true>(kog_xsum_in(p, t, KOG_N_LAYERS), kog_in_parts(KOG_N_LAYERS), c.smem,
                                              c.scratch, false);
        float* dbg = kog_debug_row(c);
        if (dbg != nullptr)
            for (int i = threadIdx.x; i < KOG_HIDDEN; i += blockDim.x)
                dbg[KOG_DBG_DOWN + (kog_u64)(KOG_N_LAYERS - 1) * KOG_DBG_LAYER + i] = c.smem[i];
#endif
    } else {
#if KOG_TP > 1
        kog_wait_counter_system(kog_counter(c, KOG_CNT_LM), (kog_u32)lm_steps * (kog_u32)p->n_lm_producers);
        if (generating && threadIdx.x == 0) cancel = kog_ld_relaxed_system(kog_counter(c, KOG_CNT_CANCEL));
#else
        kog_wait_counter(kog_counter(c, KOG_CNT_LM), (kog_u32)lm_steps * (kog_u32)p->n_lm_producers);
#endif
    }
    kog_prof(c, KOG_N_LAYERS * 16 + 4);
    int next;
    kog_u32 finish = 0u;
    if (t < last_prompt) {
        next = p->tokens[t + 1];
    } else if (p->all_logits) {
        next = 0;
        finish = 5u;                                      // FINISH_DONE: every prompt position has logits
    } else {
        next = kog_sample_token(c, g);
        const int is_eos = __syncthreads_or(eos >= 0 && eos == next);
        if (threadIdx.x == 0) {                           // stop_check
            kog_u32 reason = 0u;
            // finish codes: abi.FINISH_CODES, named in kogcupy/gpu/schedule.py (0: running)
            if (is_eos) reason = 1u;                                                   // FINISH_EOS
            if (reason == 0u && g + 1 >= p->max_new) reason = 2u;                      // FINISH_LENGTH
            if (reason == 0u && p->prompt_len + g + 1 >= p->context_length) reason = 3u;   // FINISH_CONTEXT
            if (reason == 0u && cancel != 0u) reason = 4u;                             // FINISH_CANCELLED
#if KOG_TP == 1
            if (reason == 0u && overflow != 0u) reason = 6u;                           // FINISH_OVERFLOW
#endif
            if (t + 1 < p->context_length) p->tokens[t + 1] = next;
            *slot = reason;
        }
        __syncthreads();
        finish = *slot;
    }
    if (finish != 0u) {
        if (threadIdx.x == 0) kog_st_relaxed(kog_counter(c, KOG_CNT_STOP), 1u);
    } else {
        kog_embed(c, next, t + 1);
    }
    kog_signal_counter(kog_counter(c, KOG_CNT_TOK));
    // Publish to the host once the next position is under way: token, then count, then code.
    if (threadIdx.x == 0) {
        if (generating) {
            p->host_tokens[g] = next;
            kog_fence_system();
            kog_st_release_system(p->host_ctl, (kog_u32)(g + 1));
        }
        if (finish != 0u) kog_st_release_system(p->host_ctl + 1, finish);
    }
    kog_prof(c, KOG_N_LAYERS * 16 + 5);
}
