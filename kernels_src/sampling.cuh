// ============================================================================================
// sampling.cuh -- stages sample and stop_check (one block: block 0), plus the embedding
// lookup of the next token.
//
// The algorithm is kogcupy/reference/sampling.py's, step for step: repetition penalty over the distinct
// ids of prompt + generated (each block marks its slice's ids in a bitmap) -> greedy argmax
// (lowest id on ties; without a penalty it only reduces the per-block partial argmax the LM
// head stage left) -> logits / T -> top_k -> softmax -> top_p -> min_p -> the draw: the kept id
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
KOG_DEVICE_NOINLINE float kog_draw_score(const KogParams* p, float logit, float inv_t, kog_u32 step, int id) {
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

// Order-preserving unsigned key of a float (larger float -> larger key; -0 is +0, as the
// reference's sort and argmax have them equal).
KOG_DEVICE kog_u32 kog_float_key(float f) {
    const kog_u32 u = __float_as_uint(f + 0.f);
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

// ---------------------------------------------------------------------------------------------
// The draw with a filter or a penalty: every block its slice of the vocabulary
// ---------------------------------------------------------------------------------------------
// Block b holds ids [b * KOG_SAMPLE_SLICE, (b + 1) * KOG_SAMPLE_SLICE) (KOG_SAMPLE_SLICE =
// ceil(V / blocks), build_plan.py), their logits penalised, in shared memory. A round: every
// block adds its slice's part into the workspace (integer atomics in L2: the same totals in any
// order), releases KOG_CNT_SAMPLE, waits until every block has, and reads the totals -- every
// block takes the same decisions from the same numbers, so nothing is broadcast. The draw's
// round ends in one word block 0 reads. Workspace (KogParams::sample_ws, 64-bit words), one half
// a step by the parity of the generated index; each step's blocks zero the other half for the
// next step (a block reaches step g + 1's rounds only after every block ended step g's).
//   [r * 2 * BINS, + BINS) counts, [+ BINS, + 2 * BINS) masses of radix round r < KOG_SWS_HIST
//   then scalars: [0] lmax key, [1] kept mass, [2] the draw: score key << 32 | ~id, [3, 4] the
//   selects' cut ids; then per select, each block's count of tied ids (KOG_SWS_MAX_BLOCKS)
#define KOG_SWS_BINS 2048
#define KOG_SWS_HIST 6                                     // radix rounds a step: top_k, top_p
#define KOG_SWS_SCALARS (KOG_SWS_HIST * 2 * KOG_SWS_BINS)
#define KOG_SWS_TIES (KOG_SWS_SCALARS + 8)
#define KOG_SWS_HALF (KOG_SWS_TIES + 2 * KOG_SWS_MAX_BLOCKS)   // abi.SAMPLE_WS_WORDS / 2
static_assert(2 * KOG_SWS_HALF == KOG_SWS_WORDS, "the sampler's workspace: abi.SAMPLE_WS_WORDS");
#define KOG_SAMPLE_SEEN_WORDS ((KOG_SAMPLE_SLICE + 31) / 32)
// shared memory: masses (u64) | counts (u32) | seen-id bits | the slice's logits
#define KOG_SAMPLE_SMEM_FLOATS (3 * KOG_SWS_BINS + KOG_SAMPLE_SEEN_WORDS + KOG_SAMPLE_SLICE)
#define KOG_MASS_ONE 1099511627776.f                      // 2^40: a kept weight in (0, 1] as u64

struct KogSampler {
    const KogParams* p;
    kog_u64* ws;           // this step's half of the workspace
    float* sl;             // the slice's logits (shared memory)
    int v0, n;             // first id and length of the slice
    float lmax;            // max logit (over the whole vocabulary)
    float inv_t;           // 1 / temperature
    float min_w;           // min_p (kept when weight >= min_w), 0 -> off
    kog_u32 cut_key;       // current prefix of the descending order (see file comment)
    int cut_id;
};
KOG_DEVICE float kog_weight(const KogSampler& s, float l) { return expf((l - s.lmax) * s.inv_t); }
KOG_DEVICE bool kog_kept(const KogSampler& s, int i, float l, kog_u32 k) {
    if (!(k > s.cut_key || (k == s.cut_key && i <= s.cut_id))) return false;
    return s.min_w <= 0.f || kog_weight(s, l) >= s.min_w;
}
KOG_DEVICE kog_u64 kog_mass(const KogSampler& s, float l) {
    return (kog_u64)__float2ull_rn(kog_weight(s, l) * KOG_MASS_ONE);
}

#if KOG_SAMPLE_SLICES
// One round: every block's adds are in (its release), then every block's (acquire).
KOG_DEVICE void kog_sample_round(const KogCtx& c, kog_u32& rounds) {
    kog_signal_counter(kog_counter(c, KOG_CNT_SAMPLE));
    kog_wait_counter(kog_counter(c, KOG_CNT_SAMPLE), ++rounds * gridDim.x);
}

KOG_DEVICE kog_u64 kog_block_sum_u64(kog_u64 v, float* scratch) {
    kog_u64 total;
    kog_block_prefix_incl(v, scratch, total);
    return total;
}

// Narrows s's cut to the first position of the descending order where the running count
// reaches target_c (count_mode), or the running mass reaches target_m; `sel` (0, 1) names the
// select's workspace (radix rounds 3 * sel ..., cut id, tie counts).
KOG_DEVICE void kog_select(const KogCtx& c, KogSampler& s, int sel, bool count_mode, int target_c,
                           kog_u64 target_m, kog_u32& rounds) {
    kog_u64* hm = reinterpret_cast<kog_u64*>(c.smem);
    kog_u32* hc = reinterpret_cast<kog_u32*>(c.smem + 2 * KOG_SWS_BINS);
    int* pick = reinterpret_cast<int*>(c.scratch + KOG_SLOT_FLAG + 4);          // 4 ints
    const int tid = threadIdx.x, bd = blockDim.x;
    kog_u32 prefix = 0u, mask = 0u;
    int above_c = 0, n_eq = 0;
    kog_u64 above_m = 0ull;
    for (int pass = 0; pass < 3; ++pass) {
        const int shift = pass == 0 ? 21 : (pass == 1 ? 10 : 0);
        const int nb = pass == 2 ? 1024 : 2048;
        const int bpt = nb / bd;
        kog_u64* gm = s.ws + (3 * sel + pass) * 2 * KOG_SWS_BINS;
        kog_u64* gc = gm + KOG_SWS_BINS;
        for (int b = tid; b < nb; b += bd) { hm[b] = 0ull; hc[b] = 0u; }
        __syncthreads();
        for (int i = tid; i < s.n; i += bd) {                   // this slice's histogram
            const float l = s.sl[i];
            const kog_u32 k = kog_float_key(l);
            if ((k & mask) != prefix || !kog_kept(s, s.v0 + i, l, k)) continue;
            const int b = (int)((k >> shift) & (kog_u32)(nb - 1));
            atomicAdd(hc + b, 1u);
            if (!count_mode) atomicAdd(reinterpret_cast<unsigned long long*>(hm + b),
                                       (unsigned long long)kog_mass(s, l));
        }
        __syncthreads();
        for (int b = tid; b < nb; b += bd) {                    // into the totals
            if (hc[b]) kog_red_add_u64(gc + b, hc[b]);
            if (hm[b]) kog_red_add_u64(gm + b, hm[b]);
        }
        kog_sample_round(c, rounds);
        for (int b = tid; b < nb; b += bd) { hc[b] = (kog_u32)kog_ld_tagged(gc + b); hm[b] = kog_ld_tagged(gm + b); }
        __syncthreads();
        // the scan (descending bins): the same in every block
        int lc = 0;
        kog_u64 lm = 0ull;
        for (int b = tid * bpt; b < (tid + 1) * bpt; ++b) { lc += (int)hc[b]; lm += hm[b]; }
        int tot_c;
        kog_u64 tot_m;
        const int pc = kog_block_prefix_incl(lc, c.scratch, tot_c);
        const kog_u64 pm = kog_block_prefix_incl(lm, c.scratch, tot_m);
        const int run_c0 = above_c + (tot_c - pc);             // bins above this thread's group
        const kog_u64 run_m0 = above_m + (tot_m - pm);
        if (tid == 0) { pick[0] = -1; pick[1] = nb; }
        __syncthreads();
        int run_c = run_c0;
        kog_u64 run_m = run_m0;
        for (int b = (tid + 1) * bpt - 1; b >= tid * bpt; --b) {
            const int n = (int)hc[b];
            const kog_u64 m = hm[b];
            if (n > 0) {
                atomicMin(pick + 1, b);
                const bool hit = count_mode ? (run_c < target_c && run_c + n >= target_c)
                                            : (run_m < target_m && run_m + m >= target_m);
                if (hit) atomicMax(pick, b);
            }
            run_c += n;
            run_m += m;
        }
        __syncthreads();
        const int bsel = pick[0] >= 0 ? pick[0] : pick[1];     // no hit: the last kept bin
        if (bsel / bpt == tid) {
            run_c = run_c0;
            run_m = run_m0;
            for (int b = (tid + 1) * bpt - 1; b > bsel; --b) { run_c += (int)hc[b]; run_m += hm[b]; }
            pick[2] = run_c;
            reinterpret_cast<kog_u64*>(c.scratch)[0] = run_m;   // (the prefix scans are done)
        }
        __syncthreads();
        above_c = pick[2];
        above_m = reinterpret_cast<kog_u64*>(c.scratch)[0];
        n_eq = (int)hc[bsel];
        prefix |= (kog_u32)bsel << shift;
        mask |= (kog_u32)(nb - 1) << shift;
        __syncthreads();
    }
    // Ties on the key: the j-th kept token (by id) among the n_eq equal to it. All of them
    // (j == n_eq, and always when n_eq == 1) is the cut (key, any id).
    const kog_u32 v = prefix;
    int j;
    if (count_mode) {
        j = target_c - above_c;
    } else {
        const double wv = (double)kog_mass(s, kog_key_float(v));
        j = wv > 0.0 ? (int)ceil((double)(target_m - above_m) / wv) : n_eq;
    }
    j = max(1, min(j, n_eq));
    // all n_eq kept: the cut (v, any id) -- or, on the key an earlier select cut inside, its id
    int id = v == s.cut_key ? s.cut_id : KOG_INT_MAX;
    if (j < n_eq) {                  // rare: the blocks count their tied ids, the one holding
        kog_u64* ties = s.ws + KOG_SWS_TIES + sel * KOG_SWS_MAX_BLOCKS;    // the j-th names it
        int mine = 0;
        for (int i = tid; i < s.n; i += bd) {
            const float l = s.sl[i];
            const kog_u32 k = kog_float_key(l);
            mine += (k == v && kog_kept(s, s.v0 + i, l, k)) ? 1 : 0;
        }
        int total;
        kog_block_prefix_incl(mine, c.scratch, total);
        if (tid == 0) ties[blockIdx.x] = (kog_u64)total;
        kog_sample_round(c, rounds);
        int before = 0;
        for (int b = 0; b < (int)blockIdx.x; ++b) before += (int)kog_ld_tagged(ties + b);
        if (before < j && j <= before + total && tid == 0) {   // this slice holds it: in id order
            int seen = before;
            for (int i = 0; i < s.n; ++i) {
                const float l = s.sl[i];
                const kog_u32 k = kog_float_key(l);
                if (k == v && kog_kept(s, s.v0 + i, l, k) && ++seen == j) {
                    s.ws[KOG_SWS_SCALARS + 3 + sel] = (kog_u64)(s.v0 + i);
                    break;
                }
            }
        }
        kog_sample_round(c, rounds);
        id = (int)kog_ld_tagged(s.ws + KOG_SWS_SCALARS + 3 + sel);
    }
    s.cut_key = v;
    s.cut_id = id;
}

// The draw over every block's slice (every block, generating with a filter or a penalty);
// returns the token in block 0 (-1 elsewhere).
// (Only the KOG_SAMPLE_SLICES build: the host launches it for such requests, monokernel.py.)
KOG_DEVICE bool kog_sample_on_slices(const KogParams* p, int t) {
    return t >= p->prompt_len - 1 && !p->all_logits &&
           (p->temperature == 0.f ? p->repetition_penalty != 1.f : !kog_draw_in_lm_head(p));
}
KOG_DEVICE_NOINLINE int kog_sample_slices(const KogCtx& c, int g_index, int lm_steps) {
    kog_u32& rounds = c.sample_rounds;
    const KogParams* p = c.p;
    const int tid = threadIdx.x, bd = blockDim.x;
    KogSampler s;
    s.p = p;
    s.ws = p->sample_ws + (kog_u64)(g_index & 1) * KOG_SWS_HALF;
    s.sl = c.smem + 3 * KOG_SWS_BINS + KOG_SAMPLE_SEEN_WORDS;
    s.v0 = (int)blockIdx.x * KOG_SAMPLE_SLICE;
    s.n = max(0, min(KOG_VOCAB - s.v0, KOG_SAMPLE_SLICE));
    {   // the next step's half: zeroed (this block's share)
        kog_u64* next = p->sample_ws + (kog_u64)((g_index + 1) & 1) * KOG_SWS_HALF;
        for (int i = (int)blockIdx.x * bd + tid; i < KOG_SWS_HALF; i += (int)gridDim.x * bd) next[i] = 0ull;
    }
    kog_u32* seen = reinterpret_cast<kog_u32*>(c.smem + 3 * KOG_SWS_BINS);
    const float pen = p->repetition_penalty;
    if (pen != 1.f) {                // the slice's ids among prompt + generated, once each
        for (int i = tid; i < KOG_SAMPLE_SEEN_WORDS; i += bd) seen[i] = 0u;
        __syncthreads();
        for (int i = tid; i <= c.t; i += bd) {
            const int id = kog_ld_cg_int(p->tokens + i) - s.v0;
            if (id >= 0 && id < s.n) atomicOr(seen + id / 32, 1u << (id % 32));
        }
    }
#if KOG_TP > 1
    kog_wait_counter_system(kog_counter(c, KOG_CNT_LM), (kog_u32)lm_steps * (kog_u32)p->n_lm_producers);
#else
    kog_wait_counter(kog_counter(c, KOG_CNT_LM), (kog_u32)lm_steps * (kog_u32)p->n_lm_producers);
#endif
    float lmax = KOG_NEG_INF;
    for (int i = tid; i < s.n; i += bd) {
        float l = kog_ld_cg(p->logits + s.v0 + i);
        if (pen != 1.f && (seen[i / 32] >> (i % 32)) & 1u) l = l > 0.f ? l / pen : l * pen;
        s.sl[i] = l;
        lmax = fmaxf(lmax, l);
    }
    kog_u64* draw = s.ws + KOG_SWS_SCALARS + 2;
    float bv = KOG_NEG_INF;
    int bi = KOG_INT_MAX;
    auto better = [&](int i, float v) {
        if (v > bv || (v == bv && i < bi)) { bv = v; bi = i; }
    };
    if (p->temperature == 0.f) {                                 // greedy, penalised
        for (int i = tid; i < s.n; i += bd) better(s.v0 + i, s.sl[i]);
    } else {
        s.inv_t = p->inv_temperature;
        s.lmax = 0.f;
        s.min_w = 0.f;
        s.cut_key = 0u;
        s.cut_id = KOG_INT_MAX;
        if (p->top_p < 1.f || p->min_p > 0.f) {                  // the filters that weigh ids
            lmax = kog_block_max(lmax, c.scratch);
            if (tid == 0 && s.n > 0) atomicMax(reinterpret_cast<unsigned long long*>(s.ws + KOG_SWS_SCALARS),
                                               (unsigned long long)kog_float_key(lmax));
            kog_sample_round(c, rounds);
            s.lmax = kog_key_float((kog_u32)kog_ld_tagged(s.ws + KOG_SWS_SCALARS));
        }
        __syncthreads();                                         // (the slice is in)
        if (p->top_k > 0 && p->top_k < KOG_VOCAB) kog_select(c, s, 0, true, p->top_k, 0ull, rounds);
        if (p->top_p < 1.f) {
            kog_u64 z = 0ull;
            for (int i = tid; i < s.n; i += bd) {
                const float l = s.sl[i];
                if (kog_kept(s, s.v0 + i, l, kog_float_key(l))) z += kog_mass(s, l);
            }
            z = kog_block_sum_u64(z, c.scratch);
            if (tid == 0 && z) kog_red_add_u64(s.ws + KOG_SWS_SCALARS + 1, z);
            kog_sample_round(c, rounds);
            z = kog_ld_tagged(s.ws + KOG_SWS_SCALARS + 1);
            kog_select(c, s, 1, false, 0, max(1ull, (kog_u64)ceil((double)p->top_p * (double)z)), rounds);
        }
        if (p->min_p > 0.f) s.min_w = p->min_p;
        for (int i = tid; i < s.n; i += bd) {                    // the draw: noise for kept ids
            const float l = s.sl[i];
            if (kog_kept(s, s.v0 + i, l, kog_float_key(l)))
                better(s.v0 + i, kog_draw_score(p, l, s.inv_t, (kog_u32)g_index, s.v0 + i));
        }
    }
    __syncthreads();                                             // (bi valid only where bv is)
    float best;
    const int id = kog_block_argmax(bv, bi, c.scratch, best);
    if (tid == 0 && best > KOG_NEG_INF)                          // larger score, then lower id
        atomicMax(reinterpret_cast<unsigned long long*>(draw),
                  ((unsigned long long)kog_float_key(best) << 32) | (unsigned long long)(~(kog_u32)id));
    kog_signal_counter(kog_counter(c, KOG_CNT_SAMPLE));
    ++rounds;
    if (blockIdx.x != 0) return -1;
    kog_wait_counter(kog_counter(c, KOG_CNT_SAMPLE), rounds * gridDim.x);
    return (int)~(kog_u32)kog_ld_tagged(draw);
}

#endif  // KOG_SAMPLE_SLICES

// The sampled token at position c.t (block 0, all threads) when greedy without a penalty or
// drawn by the LM head: the LM head's per-block partials reduced.
KOG_DEVICE int kog_sample_token(const KogCtx& c) {
    const KogParams* p = c.p;
    float bv = KOG_NEG_INF, v_unused;
    int bi = KOG_INT_MAX;
    // every rank's blocks (greedy: logits; drawing: scores); both loads issued before the
    // check (one L2 round trip)
    for (int b = threadIdx.x; b < KOG_TP * (int)gridDim.x; b += blockDim.x) {
        const int i = kog_ld_cg_int(p->lm_part_idx + b);
        const float v = kog_ld_cg(p->lm_part_val + b);
        if (i >= 0 && (v > bv || (v == bv && i < bi))) { bv = v; bi = i; }   // (no rows: -1)
    }
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

// Stage sample + stop_check for position c.t (block 0; with a filter or a penalty every block
// first drew over its slice of the vocabulary: `drawn`, else -1). Writes x for the next
// position, signals KOG_CNT_TOK (or sets the stop flag), and leaves the token for the host in
// the publish slots (kog_publish_token).
#define KOG_SLOT_PUBLISH (KOG_SLOT_FLAG + 9)       // scratch: the token not yet published (3 ints)
static_assert(KOG_SLOT_PUBLISH + 3 <= KOG_SCRATCH_FLOATS, "the publish slots are in the scratch area");
KOG_DEVICE void kog_stage_sample(const KogCtx& c, bool lm_ran, int lm_steps, int drawn) {
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
        kog_load_activation<KOG_HIDDEN, true, KOG_IN_COPIES>(kog_xsum_in(p, t, KOG_N_LAYERS), kog_in_parts(KOG_N_LAYERS), c.smem,
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
        next = drawn >= 0 ? drawn : kog_sample_token(c);
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
    if (threadIdx.x == 0) {                               // for kog_publish_token
        int* pub = reinterpret_cast<int*>(c.scratch + KOG_SLOT_PUBLISH);
        pub[0] = generating ? g + 1 : 0;
        pub[1] = next;
        pub[2] = (int)finish;
    }
    kog_prof(c, KOG_N_LAYERS * 16 + 5);
}

// Block 0's thread 0 publishes the sampler's token to the host: token, then count, then code.
// The system-scope fence waits for the PCIe writes (before it, block 0 entered layer 0's qkv
// ~2 us later than now: the 2026-12-06 traces), so it runs once the next position is under
// way: after block 0's layer-0 qkv rows (monokernel.cu), or when the launch ends.
KOG_DEVICE void kog_publish_token(const KogCtx& c) {
    int* pub = reinterpret_cast<int*>(c.scratch + KOG_SLOT_PUBLISH);
    if (threadIdx.x != 0) return;
    const KogParams* p = c.p;
    if (pub[0] > 0) {
        p->host_tokens[pub[0] - 1] = pub[1];
        kog_fence_system();
        kog_st_release_system(p->host_ctl, (kog_u32)pub[0]);
    }
    if (pub[2] != 0) kog_st_release_system(p->host_ctl + 1, (kog_u32)pub[2]);
    pub[0] = pub[2] = 0;
}
