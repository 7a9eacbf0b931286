// ============================================================================================
// attention.cuh -- stage attention (GQA), split over KV positions.
//
// A unit is (kv head g, chunk of positions). Its block takes the q rows of the G = H / KV
// q heads sharing g from the qkv buffer, applies qwen3 qk-norm and RoPE (norm_rope.cuh), and
// computes fp32 softmax(q k^T / sqrt(hd)) v over its chunk: out, running max and sum per head.
// The chunk streams through shared memory in tiles of KOG_ATTN_TILE positions, KOG_ATTN_BUFS
// tiles in flight (one cp.async group each; the first ones issued before q is ready), with an
// online softmax across tiles; the chunk rule gives every kv head at most attn_max_chunks
// units, so a long context is one round of units, each streaming many tiles.
// The unit whose chunk holds the current position also finishes k and v of that position and
// appends them to the KV cache (no other unit reads that position in this step).
// With one chunk the unit writes attn_out directly. Otherwise every other unit writes its
// partial as tagged words and the unit holding t polls them and combines (SYNC.md).
// Scores: HD / 8 lanes per position. The appending unit releases a per-(layer, kv head)
// count of cached positions, which units of later steps acquire before reading the cache.
// ============================================================================================
#pragma once
#include "norm_rope.cuh"


// Shared memory of one unit (floats): q[GQA][HD], kv_t[2][HD], o[GQA][HD], probs[GQA][TILE],
// ml[GQA][2], rope[HD], then KOG_ATTN_BUFS staging buffers, each one tile of cached K rows
// then V rows (storage dtype, TILE x HD each).
#define KOG_ATTN_ML_FLOATS ((2 * KOG_GQA + 3) / 4 * 4)
// Float offset of the K/V staging buffers (everything before them in the layout above).
#define KOG_ATTN_STAGE_OFFSET \
    (KOG_GQA * KOG_HEAD_DIM * 2 + 2 * KOG_HEAD_DIM + KOG_GQA * KOG_ATTN_TILE + KOG_ATTN_ML_FLOATS + KOG_HEAD_DIM)
#define KOG_ATTN_SMEM_FLOATS (KOG_ATTN_STAGE_OFFSET + KOG_ATTN_BUFS * KOG_ATTN_TILE * KOG_HEAD_DIM)

// Chunk length and count for n_pos attended positions (same rule as placement.attention_chunks).
KOG_DEVICE int kog_attn_chunk_len(int n_pos, int max_chunks) {
    int len = (n_pos + max_chunks - 1) / max_chunks;
    len = (len + KOG_ATTN_MIN_CHUNK - 1) / KOG_ATTN_MIN_CHUNK * KOG_ATTN_MIN_CHUNK;
    return len < KOG_ATTN_CHUNK ? len : KOG_ATTN_CHUNK;
}

// Cached K/V rows [a, min(a + TILE, jc1)) of (layer, kv head g) into staging buffer i % BUFS
// (K then V), as one commit group, empty or not: "at most BUFS - 1 groups in flight" then
// means tile i has landed. (Pointers recomputed here: nothing extra stays live in the unit.)
KOG_DEVICE void kog_attn_stage_tile(const KogCtx& c, int layer, int g, int a, int jc1, int i) {
    constexpr int HD = KOG_HEAD_DIM, T = KOG_ATTN_TILE;
    const int n16 = (min(jc1, a + T) - a) * HD / 8;      // 16-byte pieces per matrix
    const kog_u64 row = (((kog_u64)layer * KOG_N_KV + g) * c.p->context_length + a) * HD;
    kog_u16* ks = reinterpret_cast<kog_u16*>(c.smem + KOG_ATTN_STAGE_OFFSET) + (i % KOG_ATTN_BUFS) * 2 * T * HD;
    for (int k = threadIdx.x; k < n16; k += blockDim.x) {
        kog_copy16(ks + k * 8, c.p->k_cache + row + k * 8);
        kog_copy16(ks + T * HD + k * 8, c.p->v_cache + row + k * 8);
    }
    kog_copy16_commit();
}

// One staged tile [a, b) of a unit (buffer buf): scores, online softmax (rescaling o of the
// earlier tiles when `rescale`), o += probs @ v. Its own function, not inlined: the tile loop
// inlined into the monokernel raised register pressure until ptxas spilled in the GEMV loops
// (-13% decode on Llama-3.2-1B at position 32, H200).
__device__ __noinline__ void kog_attn_tile(const KogCtx& c, int a, int b, int buf, bool rescale) {
    constexpr int HD = KOG_HEAD_DIM, G = KOG_GQA, T = KOG_ATTN_TILE;
    const int t = c.t;
    const int lane = threadIdx.x % KOG_WARP, warp = threadIdx.x / KOG_WARP;
    const int n_warps = blockDim.x / KOG_WARP;
    const float qscale = rsqrtf((float)HD);
    const float* q = c.smem;                    // the unit's shared memory, as in kog_stage_attention
    const float* kv_t = q + G * HD;
    float* o = const_cast<float*>(kv_t) + 2 * HD;
    float* probs = o + G * HD;
    float* ml = probs + G * T;
    const kog_u16* ks = reinterpret_cast<const kog_u16*>(c.smem + KOG_ATTN_STAGE_OFFSET) + buf * 2 * T * HD;
    const kog_u16* vs = ks + T * HD;

    // ---- scores: HD / 8 lanes per position, one 16-byte K piece each (conflict-free
    //      shared loads), G dot products reduced over the lane group; a uniform trip count
    //      so every lane of a warp takes part in the shuffles ----
    {
        constexpr int LPP = HD / 8;
        static_assert(HD % 8 == 0 && KOG_WARP % LPP == 0 && (LPP & (LPP - 1)) == 0,
                      "attention scores: HD / 8 lanes per position must divide the warp");
        const int sub = threadIdx.x % LPP, pi = threadIdx.x / LPP;
        const int n_pi = blockDim.x / LPP;
        for (int jb = a; jb < b; jb += n_pi) {
            const int j = jb + pi;
            float kd[8];
            if (j == t) {
#pragma unroll
                for (int e = 0; e < 8; ++e) kd[e] = kv_t[sub * 8 + e];
            } else if (j < b) {
                const kog_vec4 kv = *reinterpret_cast<const kog_vec4*>(ks + (j - a) * HD + sub * 8);
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    kd[2 * e] = kog_w_lo(KOG_V4(kv, e));
                    kd[2 * e + 1] = kog_w_hi(KOG_V4(kv, e));
                }
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) kd[e] = 0.f;
            }
#pragma unroll
            for (int h = 0; h < G; ++h) {
                const float4 qa = *reinterpret_cast<const float4*>(q + h * HD + sub * 8);
                const float4 qb = *reinterpret_cast<const float4*>(q + h * HD + sub * 8 + 4);
                float s = qa.x * kd[0];
                s = fmaf(qa.y, kd[1], s); s = fmaf(qa.z, kd[2], s); s = fmaf(qa.w, kd[3], s);
                s = fmaf(qb.x, kd[4], s); s = fmaf(qb.y, kd[5], s); s = fmaf(qb.z, kd[6], s);
                s = fmaf(qb.w, kd[7], s);
#pragma unroll
                for (int m = LPP / 2; m > 0; m >>= 1) s += kog_shfl_xor(s, m);
                if (sub == 0 && j < b) probs[h * T + (j - a)] = s * qscale;
            }
        }
    }
    __syncthreads();

    // ---- online softmax over the tile: one warp per head; o of the earlier tiles is
    //      rescaled to the new running max ----
    for (int h = warp; h < G; h += n_warps) {
        float* s = probs + h * T;
        const float m_old = ml[2 * h];
        float m = KOG_NEG_INF;
        for (int j = lane; j < b - a; j += KOG_WARP) m = fmaxf(m, s[j]);
        m = fmaxf(m_old, kog_warp_max(m));
        float l = 0.f;
        for (int j = lane; j < b - a; j += KOG_WARP) {
            const float e = expf(s[j] - m);
            s[j] = e;
            l += e;
        }
        l = kog_warp_sum(l);
        if (rescale) {
            const float alpha = expf(m_old - m);
            for (int d = lane; d < HD; d += KOG_WARP) o[h * HD + d] *= alpha;
            l = fmaf(ml[2 * h + 1], alpha, l);
        }
        kog_syncwarp();
        if (lane == 0) { ml[2 * h] = m; ml[2 * h + 1] = l; }
    }
    __syncthreads();

    // ---- o = probs @ v: thread (position lane jp, dim d), shared atomics combine ----
    {
        const int d = threadIdx.x % HD, jp = threadIdx.x / HD, n_jp = blockDim.x / HD;
        float acc[G];
#pragma unroll
        for (int h = 0; h < G; ++h) acc[h] = 0.f;
        if (jp < n_jp) {
            for (int j = a + jp; j < b; j += n_jp) {
                const float v = j == t ? kv_t[HD + d] : kog_w_to_f32(vs[(j - a) * HD + d]);
#pragma unroll
                for (int h = 0; h < G; ++h) acc[h] = fmaf(probs[h * T + j - a], v, acc[h]);
            }
#pragma unroll
            for (int h = 0; h < G; ++h) atomicAdd(o + h * HD + d, acc[h]);
        }
    }
}

KOG_DEVICE void kog_stage_attention(const KogCtx& c, int layer) {
    constexpr int HD = KOG_HEAD_DIM, G = KOG_GQA, T = KOG_ATTN_TILE, NB = KOG_ATTN_BUFS;
    static_assert(NB >= 1 && NB <= 4 && T % 8 == 0, "1-4 staged tiles of a multiple of 8 positions");
    const KogParams* p = c.p;
    const int t = c.t, n_pos = t + 1;
    const int chunk = kog_attn_chunk_len(n_pos, p->attn_max_chunks);
    const int n_chunks = (n_pos + chunk - 1) / chunk;
    const int n_units = KOG_N_KV * n_chunks;
    const int warp = threadIdx.x / KOG_WARP;
    const int n_warps = blockDim.x / KOG_WARP;
    float* q = c.smem;                          // [G][HD]
    float* kv_t = q + G * HD;                   // [2][HD] k, v of the current position
    float* o = kv_t + 2 * HD;                   // [G][HD]
    float* probs = o + G * HD;                  // [G][T] scores, then probabilities, of a tile
    float* ml = probs + G * T;                  // [G][2] running max, sum
    float* rope = ml + KOG_ATTN_ML_FLOATS;      // [HD] cos, sin of position t (half each)
    kog_u16* stage = reinterpret_cast<kog_u16*>(rope + HD);   // [NB][K, V][T][HD]
    static_assert(KOG_ATTN_STAGE_OFFSET == G * HD * 2 + 2 * HD + G * T + KOG_ATTN_ML_FLOATS + HD &&
                  KOG_ATTN_STAGE_OFFSET % 4 == 0, "K/V staging 16-byte aligned, after rope");
    float* dbg = kog_debug_row(c);
    const kog_u32 qkv_tag = kog_tag(t, layer, KOG_STAGE_QKV);
    const kog_u32 out_tag = kog_tag(t, layer, KOG_STAGE_ATTN);
    kog_prof(c, layer * 16 + 3);

    // After a step whose LM head ran, the appends of every earlier step are already ordered
    // before this one: each block releases the LM counter after its attention stages, the
    // sampler acquires all of them before it releases KOG_CNT_TOK, and every block acquires that
    // at layer 0 (SYNC.md). The per-head count is then not polled (one round trip less before
    // the K/V copies); in the prompt (no LM head) it is the real dependency and is polled.
    const bool kv_ordered = KOG_TP == 1 && t > 0 &&
                            (p->all_logits || t - 1 >= p->prompt_len - 1) &&
                            p->n_lm_producers == (int)gridDim.x;
    // Units go to blocks from the top of the grid down (block 0 also samples).
    for (int u = gridDim.x - 1 - blockIdx.x; u < n_units; u += gridDim.x) {
        const int g = u % KOG_N_KV, ch = u / KOG_N_KV;
        const int j0 = ch * chunk, j1 = min(n_pos, j0 + chunk);
        const bool holds_t = j1 == n_pos;
        kog_u32* kv_count = kog_counter(c, KOG_CNT_KV + layer * KOG_N_KV + g);
        const kog_u64 kv_base = ((kog_u64)layer * KOG_N_KV + g) * p->context_length;
        kog_u16* kc = p->k_cache + kv_base * HD;
        kog_u16* vc = p->v_cache + kv_base * HD;

        // ---- before q is ready: the first NB tiles of cached K/V rows and the RoPE row ----
        const int jc1 = min(j1, t);               // cached positions [j0, jc1)
        __syncthreads();                          // shared memory: the previous stage is done
        if (j0 < jc1 && !kv_ordered) {            // appended by units of earlier steps
            if (threadIdx.x == 0)
                while (kog_ld_acquire(kv_count) < (kog_u32)jc1) kog_pause();
            __syncthreads();
        }
        for (int i = 0; i < NB; ++i) kog_attn_stage_tile(c, layer, g, j0 + i * T, jc1, i);
        // the RoPE row goes to registers now and to shared memory after the polls below, so
        // that its round trip overlaps theirs (a poll orders every earlier memory access)
        static_assert(HD <= KOG_THREADS, "one RoPE value per thread");
        float rope_v = 0.f;
        if (threadIdx.x < HD)
            rope_v = threadIdx.x < HD / 2 ? p->rope_cos[(kog_u64)t * (HD / 2) + threadIdx.x]
                                          : p->rope_sin[(kog_u64)t * (HD / 2) + threadIdx.x - HD / 2];

        // ---- q of the G heads (+ k, v of position t): qk-norm, RoPE, KV append ----
        // Every thread issues its loads of q (and of this position's k, v) before checking any:
        // one round trip once the qkv rows are there.
        {
            constexpr int N_MAX = G * HD + 2 * HD;
            constexpr int PER = (N_MAX + KOG_THREADS - 1) / KOG_THREADS;
            const int n_in = G * HD + (holds_t ? 2 * HD : 0);
            kog_u64 w[PER];
            const kog_u64* src[PER];
#pragma unroll
            for (int k = 0; k < PER; ++k) {
                const int i = threadIdx.x + k * KOG_THREADS, ii = i - G * HD;
                src[k] = i < G * HD ? p->qkv + g * G * HD + i
                                    : p->qkv + KOG_Q_DIM + (ii < HD ? 0 : KOG_KV_DIM - HD) + g * HD + ii;
                w[k] = i < n_in ? kog_ld_tagged(src[k]) : (kog_u64)qkv_tag << 32;
            }
            for (;;) {
                bool ready = true;
#pragma unroll
                for (int k = 0; k < PER; ++k)
                    if (kog_tag_of(w[k]) != qkv_tag) { ready = false; w[k] = kog_ld_tagged(src[k]); }
                if (ready) break;
            }
#pragma unroll
            for (int k = 0; k < PER; ++k) {
                const int i = threadIdx.x + k * KOG_THREADS;
                if (i < G * HD) q[i] = kog_value_of(w[k]);
                else if (i < n_in) kv_t[i - G * HD] = kog_value_of(w[k]);
            }
        }
        if (threadIdx.x < HD) rope[threadIdx.x] = rope_v;
        __syncthreads();
        kog_prof(c, layer * 16 + 4);
        const float* qn = KOG_QK_NORM ? p->q_norm + (kog_u64)layer * HD : nullptr;
        const float* kn = KOG_QK_NORM ? p->k_norm + (kog_u64)layer * HD : nullptr;
        for (int h = warp; h < G + (holds_t ? 1 : 0); h += n_warps)
            kog_head_norm_rope(h < G ? q + h * HD : kv_t, h < G ? qn : kn, rope);
        __syncthreads();
        if (holds_t) {
            for (int i = threadIdx.x; i < 2 * HD; i += blockDim.x) {
                kog_u16 w = kog_f32_to_w(kv_t[i]);
                if (i < HD) kc[(kog_u64)t * HD + i] = w; else vc[(kog_u64)t * HD + i - HD] = w;
                kv_t[i] = kog_w_to_f32(w);        // attend to what later steps will read
            }
            if (dbg != nullptr) {
                float* d = dbg + KOG_DBG_QKV + (kog_u64)layer * KOG_DBG_LAYER;
                for (int i = threadIdx.x; i < G * HD; i += blockDim.x) d[g * G * HD + i] = q[i];
                for (int i = threadIdx.x; i < 2 * HD; i += blockDim.x)
                    d[KOG_Q_DIM + (i < HD ? 0 : KOG_KV_DIM - HD) + g * HD + i] = kv_t[i];
            }
        }
        for (int i = threadIdx.x; i < G * HD; i += blockDim.x) o[i] = 0.f;
        if (threadIdx.x < G) { ml[2 * threadIdx.x] = KOG_NEG_INF; ml[2 * threadIdx.x + 1] = 0.f; }

        for (int a = j0, buf = 0; a < j1; a += T, buf = buf + 1 == NB ? 0 : buf + 1) {
            kog_copy16_wait_groups<NB - 1>();     // this thread's copies of the tile have landed
            __syncthreads();                      // ... everyone's (and o, ml are initialised)
            kog_attn_tile(c, a, min(j1, a + T), buf, a > j0);
            __syncthreads();                      // o holds the tile; its buffer is free
            kog_attn_stage_tile(c, layer, g, a + NB * T, min(j1, t), buf);
        }

        // ---- finish: direct; or every other chunk writes its partial as tagged words and the
        //      unit holding t (the last chunk, the last unit of its block: no wait cycle)
        //      polls them and combines with its own partial from shared memory -- no ticket
        //      round trip, one pass over the partials ----
        if (n_chunks == 1 || holds_t) {
            // (h, d) pairs are split over S thread groups (the block has S x G x HD threads at
            // least), group s combining batches s, s + S, ... of B partials each: a long
            // context's partials are in flight together instead of in ceil(C / B) rounds.
            // Group s > 0 leaves (max, sum, acc) in shared memory (the K staging area, done
            // with), group 0 merges them in group order and writes attn_out.
            constexpr int GH = G * HD;
            constexpr int S = KOG_THREADS / GH >= 4 ? 4 : (KOG_THREADS / GH >= 2 ? 2 : 1);
            constexpr int B = 4;                      // partials in flight per thread
            constexpr int W = G * (HD + 2);           // words per chunk
            const kog_u64* pbase = reinterpret_cast<const kog_u64*>(p->attn_partial) +
                                   (kog_u64)g * p->attn_chunks_alloc * W;
            float* stash = reinterpret_cast<float*>(stage);       // [S - 1][3][GH]
            static_assert(3 * (S - 1) * GH <= NB * T * HD, "combine stash fits");
            for (int i0 = 0; i0 < GH * S; i0 += blockDim.x) {
                const int ti = i0 + threadIdx.x;
                const int grp = ti / GH, i = ti - grp * GH;
                const int h = i / HD, d = i - h * HD;
                float m = KOG_NEG_INF, l = 0.f, acc = 0.f;
                if (grp == 0) { m = ml[2 * h]; l = ml[2 * h + 1]; acc = o[i]; }
                const kog_u64* ph = pbase + h * (HD + 2);      // (max, sum) 16-byte aligned
                for (int k0 = grp * B; grp < S && k0 < n_chunks - 1; k0 += S * B) {
                    const int nb = min(B, n_chunks - 1 - k0);
                    const kog_u64* pk = ph + (kog_u64)k0 * W;
                    kog_u64 wm[B], wl[B], wo[B];
#pragma unroll
                    for (int b = 0; b < B; ++b) {
                        wm[b] = wl[b] = wo[b] = (kog_u64)out_tag << 32;
                        if (b < nb) {
                            kog_ld_tagged2(pk + b * W + HD, wm[b], wl[b]);
                            wo[b] = kog_ld_tagged(pk + b * W + d);
                        }
                    }
                    for (;;) {
                        bool ready = true;
#pragma unroll
                        for (int b = 0; b < B; ++b) {
                            if (kog_tag_of(wm[b]) != out_tag || kog_tag_of(wl[b]) != out_tag) {
                                ready = false;
                                kog_ld_tagged2(pk + b * W + HD, wm[b], wl[b]);
                            }
                            if (kog_tag_of(wo[b]) != out_tag) { ready = false; wo[b] = kog_ld_tagged(pk + b * W + d); }
                        }
                        if (ready) break;
                    }
#pragma unroll
                    for (int b = 0; b < B; ++b) {
                        if (b < nb) {
                            const float mk = kog_value_of(wm[b]);
                            const float mn = fmaxf(m, mk);
                            const float a = expf(m - mn), e = expf(mk - mn);
                            l = fmaf(l, a, kog_value_of(wl[b]) * e);
                            acc = fmaf(acc, a, kog_value_of(wo[b]) * e);
                            m = mn;
                        }
                    }
                }
                if (grp > 0 && grp < S) {
                    float* st = stash + (grp - 1) * 3 * GH;
                    st[i] = m; st[GH + i] = l; st[2 * GH + i] = acc;
                }
                if (S > 1) __syncthreads();
                if (grp == 0) {
                    for (int s2 = 1; s2 < S; ++s2) {
                        const float* st = stash + (s2 - 1) * 3 * GH;
                        const float mk = st[i];
                        if (!(mk > KOG_NEG_INF)) continue;          // that group had no partials
                        const float mn = fmaxf(m, mk);
                        const float a = expf(m - mn), e = expf(mk - mn);
                        l = fmaf(l, a, st[GH + i] * e);
                        acc = fmaf(acc, a, st[2 * GH + i] * e);
                        m = mn;
                    }
                    const float out = acc / l;
                    kog_st_tagged(p->attn_out + g * G * HD + i, out, out_tag);
                    if (dbg != nullptr) dbg[KOG_DBG_ATTENTION + (kog_u64)layer * KOG_DBG_LAYER + g * G * HD + i] = out;
                }
                if (S > 1) __syncthreads();
            }
        } else {
            kog_u64* part = reinterpret_cast<kog_u64*>(p->attn_partial) +
                            ((kog_u64)g * p->attn_chunks_alloc + ch) * G * (HD + 2);
            for (int i = threadIdx.x; i < G * (HD + 2); i += blockDim.x) {
                const int h = i / (HD + 2), k = i - h * (HD + 2);
                kog_st_tagged(part + i, k < HD ? o[h * HD + k] : ml[2 * h + (k - HD)], out_tag);
            }
        }
        if (holds_t) kog_signal_counter(kv_count);   // position t of head g is in the cache
        else __syncthreads();                     // shared buffers are reused by the next unit
    }
    kog_prof(c, layer * 16 + 5);
}
