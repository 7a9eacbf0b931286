// ============================================================================================
// attention.cuh -- stage attention (GQA), split over KV positions.
//
// A unit is (kv head g, chunk of positions). Its block takes the q rows of the G = H / KV
// q heads sharing g from the qkv buffer, applies qwen3 qk-norm and RoPE (norm_rope.cuh), and
// computes fp32 softmax(q k^T / sqrt(hd)) v over its chunk: out, running max and sum per head.
// The chunk streams through shared memory in tiles of KOG_ATTN_TILE positions, KOG_ATTN_BUFS
// tiles in flight (one cp.async group each; the first ones issued before q is ready); each
// slice of every tile is staged and consumed by its own warps with an online softmax state in
// registers across the tiles (kog_attn_chunk); the chunk rule gives every kv head at most
// attn_max_chunks units, so a long context is one round of units. On NVIDIA a slice is 16
// consecutive positions and its products run on the tensor cores (KOG_ATTN_MMA); on AMD (and
// head dims that are not a multiple of 16) a warp's lanes hold 8 dims of a head each.
// The unit whose chunk holds the current position also finishes k and v of that position and
// appends them to the KV cache (no other unit reads that position in this step).
// One GPU: every unit writes its partial (out, max, sum) as tagged words and o_proj's items
// merge their head group's (kog_attn_combine). Tensor parallel: the unit holding t merges the
// other chunks' partials with its own into attn_out (SYNC.md).
// The appending unit releases a per-(layer, kv head)
// count of cached positions, which units of later steps acquire before reading the cache.
// ============================================================================================
#pragma once
#include "norm_rope.cuh"

#if !defined(KOG_HIP) && KOG_HEAD_DIM % 16 == 0
#define KOG_ATTN_MMA 1           // (placement.attn_mma mirrors this)
#else
#define KOG_ATTN_MMA 0
#endif


// Shared memory of one unit (floats): q[GQA][HD], kv_t[2][HD], o[GQA][HD] (before the chunk:
// the qk-norm gammas), ml[GQA][2], rope[HD], then the K/V staging area: KOG_ATTN_BUFS buffers
// of a tile's K rows then V rows (storage dtype) for each group of positions of the layout
// below (a 16-position group of the tensor-core layout, a warp's PW positions of the lane
// layout), then the layout's own.
#define KOG_ATTN_ML_FLOATS ((2 * KOG_GQA + 3) / 4 * 4)
// Float offset of the K/V staging area (everything before it in the layout above).
#define KOG_ATTN_STAGE_OFFSET (KOG_GQA * KOG_HEAD_DIM * 2 + 2 * KOG_HEAD_DIM + KOG_ATTN_ML_FLOATS + KOG_HEAD_DIM)


// The combine's thread groups KOG_ATTN_COMBINE_S (kog_attn_combine; placement.attn_combine_groups)
// and the partials each thread has in flight KOG_ATTN_COMBINE_B: an o_proj item merges S * B
// chunk partials a round.
#if !defined(KOG_ATTN_COMBINE_S) || !defined(KOG_ATTN_COMBINE_B) || !defined(KOG_ATTN_COMBINE_P) || \
    !defined(KOG_ATTN_FREE_CHUNKS) || !defined(KOG_ATTN_CHUNK_BALANCE)
#error "the combine's and the chunk rule's constants come from kernels.py (placement.py)"
#endif

// Chunk length for n_pos attended positions (placement.attention_chunk_len, the same rule):
// at most KOG_ATTN_FREE_CHUNKS chunks a kv head, or isqrt(n_pos * S * B / KOG_ATTN_CHUNK_BALANCE)
// at long contexts -- each round of partials the combine merges is a dependent L2 round trip,
// a longer chunk is a unit's streaming time -- and at most max_chunks (one round of units).
// Thread 0 computes it once a position (monokernel.cu: the KOG_SLOT_ATTN_CHUNK scratch slot).
KOG_DEVICE int kog_attn_chunk_len(int n_pos, int max_chunks) {
    const int x = n_pos * (KOG_ATTN_COMBINE_S * KOG_ATTN_COMBINE_B) / KOG_ATTN_CHUNK_BALANCE;
    int r = (int)sqrtf((float)x);
    while (r > 0 && r * r > x) --r;
    while ((r + 1) * (r + 1) <= x) ++r;
    r = r > KOG_ATTN_FREE_CHUNKS ? r : KOG_ATTN_FREE_CHUNKS;
    const int n_chunks = r < max_chunks ? r : max_chunks;
    int len = (n_pos + n_chunks - 1) / n_chunks;
    len = (len + KOG_ATTN_MIN_CHUNK - 1) / KOG_ATTN_MIN_CHUNK * KOG_ATTN_MIN_CHUNK;
    return len < KOG_ATTN_CHUNK ? len : KOG_ATTN_CHUNK;
}
#define KOG_SLOT_ATTN_CHUNK (KOG_SLOT_FLAG + 8)    // scratch: this position's chunk length
static_assert(KOG_SLOT_ATTN_CHUNK < KOG_SCRATCH_FLOATS, "the chunk length's slot is in the scratch area");
KOG_DEVICE int kog_attn_chunk_len_now(const KogCtx& c) {
    return *reinterpret_cast<const int*>(c.scratch + KOG_SLOT_ATTN_CHUNK);
}
KOG_DEVICE int kog_attn_n_chunks(int n_pos, int chunk) { return (n_pos + chunk - 1) / chunk; }

// The chunk's end: n partial states [G][HD + 2] (unnormalised o, max in log2 units, sum), one
// every `stride` floats from the staging area, merged into the unit's partial o, ml (max in
// natural units: the combine's).
KOG_DEVICE void kog_attn_merge_states(int n, int stride, float* o, float* ml) {
    constexpr int HD = KOG_HEAD_DIM;
    const float* ws0 = kog_smem() + KOG_ATTN_STAGE_OFFSET;
    for (int i = threadIdx.x; i < KOG_GQA * HD; i += KOG_THREADS) {
        const int h = i / HD, d = i - h * HD;
        float m = KOG_NEG_INF;
        for (int w = 0; w < n; ++w) m = fmaxf(m, ws0[w * stride + h * (HD + 2) + HD]);
        float sl = 0.f, so = 0.f;
        for (int w = 0; w < n; ++w) {
            const float* st = ws0 + w * stride + h * (HD + 2);
            const float f = st[HD] > KOG_NEG_INF ? kog_exp2(st[HD] - m) : 0.f;
            sl = fmaf(st[HD + 1], f, sl);
            so = fmaf(st[d], f, so);
        }
        o[i] = so;
        if (d == 0) { ml[2 * h] = m * 0.6931471805599453f; ml[2 * h + 1] = sl; }
    }
    __syncthreads();                                          // o, ml are the unit's partial
}

#if KOG_ATTN_MMA
// Tensor-core layout of a unit's chunk: a tile is NWA = TILE / 16 groups of 16 consecutive
// positions, group q taking [a + 16 q, a + 16 q + 16) of the tile at a; DS warps share a group
// (DS = the block's warps / NWA, as far as it divides the head's 16-dim slices: 2 in the
// default 128-position tiles of 16 warps, 1 in 256-position ones), stage its 16 K rows then
// 16 V rows together (storage dtype, row-major, each row's 16-byte pieces XOR-swizzled by the
// row so that ldmatrix's eight row addresses fall in different banks); the block meets at a barrier
// per tile (a warp's own when DS = 1).
// Per 16 positions each warp of a group computes S^T = K q^T (positions x heads: m16n8k16,
// A = K from ldmatrix, B = q from shared memory) and the softmax, and O^T += V^T P^T for its
// 1 / DS of the dims (A = V^T from ldmatrix.trans, B = P^T from S^T's accumulators by
// movmatrix); q and P enter as hi + lo pairs in the storage dtype (~16 mantissa bits, so the
// result stays close to the fp32 reference).
#define KOG_ATTN_GROUP 16
#define KOG_ATTN_NWA (KOG_ATTN_TILE / KOG_ATTN_GROUP)
#define KOG_ATTN_DS_MAX (KOG_THREADS / KOG_WARP / KOG_ATTN_NWA)
#define KOG_ATTN_NK (KOG_HEAD_DIM / 16)
#define KOG_ATTN_DS (KOG_ATTN_DS_MAX >= 4 && KOG_ATTN_NK % 4 == 0 ? 4 : \
                     KOG_ATTN_DS_MAX >= 2 && KOG_ATTN_NK % 2 == 0 ? 2 : 1)
// After the staging area: q^T's mma fragments, each lane's (hi b0, hi b1, lo b0, lo b1) per
// 8-head n-tile and 16-dim k-step (kept in shared memory: registers are the scarce resource).
#define KOG_ATTN_NT ((KOG_GQA + 7) / 8)
#define KOG_ATTN_QF_OFFSET (KOG_ATTN_STAGE_OFFSET + KOG_ATTN_BUFS * KOG_ATTN_TILE * KOG_HEAD_DIM)
#define KOG_ATTN_SMEM_FLOATS (KOG_ATTN_QF_OFFSET + KOG_ATTN_NT * KOG_HEAD_DIM * 8)
static_assert(KOG_ATTN_TILE % KOG_ATTN_GROUP == 0 && KOG_ATTN_NWA <= KOG_THREADS / KOG_WARP,
              "attention: a tile is 16 positions for each of at most all warps "
              "(build_plan.attn_tile_problem mirrors it)");
// The warps of every group meet (their copies of a tile landed / they are done with a
// buffer): the block, or with one warp a group the warp. (With a named barrier per group,
// compute-sanitizer racecheck reported hazards all over the kernel; a block barrier it checks.)
KOG_DEVICE void kog_attn_tile_sync() {
    if (KOG_ATTN_DS > 1) __syncthreads();
    else kog_syncwarp();
}

// Where 16-byte piece c of staged row r sits in its row: XOR-swizzled so that the 8 rows an
// ldmatrix reads fall in different banks (by r % 8; rows of 2 or 4 pieces by r / (8 / P16)).
KOG_DEVICE int kog_attn_swz(int r, int c) {
    constexpr int P16 = KOG_HEAD_DIM / 8;
    static_assert((P16 & (P16 - 1)) == 0, "K/V rows of a power of two of 16-byte pieces "
                                          "(head_dim divides the block's threads)");
    constexpr int DIV = P16 >= 8 ? 1 : 8 / P16, MASK = (P16 >= 8 ? 8 : P16) - 1;
    return c ^ ((r / DIV) & MASK);
}

// Group q's 16 rows of tile i (positions from a + 16 q; kc, vc: the (layer, kv head) rows of
// the caches) into its staging buffer i % BUFS (K then V), the group's warps a share each,
// as one commit group, empty or not: "at most BUFS - 1 groups in flight" then means this
// thread's part of tile i has landed. Rows at or past jc1 (position t, positions past the
// chunk) are zero-filled; none is staged for a group that starts at or past j1 (never read).
KOG_DEVICE void kog_attn_stage_tile(const kog_u16* kc, const kog_u16* vc, kog_u16* stage, int a,
                                    int jc1, int j1, int i) {
    constexpr int HD = KOG_HEAD_DIM, R = KOG_ATTN_GROUP, P16 = HD / 8;
    const int warp = threadIdx.x / KOG_WARP, grp = warp % KOG_ATTN_NWA, ds = warp / KOG_ATTN_NWA;
    const int jg = a + grp * R;
    if (ds < KOG_ATTN_DS && jg < j1) {
        kog_u16* ks = stage + (grp * KOG_ATTN_BUFS + i % KOG_ATTN_BUFS) * 2 * R * HD;
#pragma unroll 1
        for (int k = threadIdx.x % KOG_WARP + ds * KOG_WARP; k < R * P16; k += KOG_ATTN_DS * KOG_WARP) {
            const int r = k / P16, c = k - r * P16;
            const bool cached = jg + r < jc1;
            const kog_u64 src = (kog_u64)(cached ? jg + r : 0) * HD + c * 8;
            const int dst = r * HD + kog_attn_swz(r, c) * 8;
            kog_copy16_zfill(kog_smem_addr(ks + dst), kc + src, cached);
            kog_copy16_zfill(kog_smem_addr(ks + R * HD + dst), vc + src, cached);
        }
    }
    kog_copy16_commit();
}

// The unit's chunk [j0, j1) (its first BUFS tiles already staged; q, k / v of position t in
// shared memory): fp32 softmax(q k^T / sqrt(hd)) v for the G heads, left in shared memory as
// o (unnormalised) and ml (running max, sum), the state the combine merges. Every warp keeps
// its online-softmax state in mma accumulators across its groups; at the end the warps merge
// through shared memory (a chunk of one group has nothing to merge: its warps store their
// state). Not inlined: the monokernel sits at the register ceiling, and every register the
// chunk loop used in the caller would be one fewer for the GEMV loops.
__device__ __noinline__ void kog_attn_chunk(const KogCtx& c, int layer, int g, int j0, int j1) {
    constexpr int HD = KOG_HEAD_DIM, G = KOG_GQA, T = KOG_ATTN_TILE, NB = KOG_ATTN_BUFS;
    constexpr int R = KOG_ATTN_GROUP, NWA = KOG_ATTN_NWA, DS = KOG_ATTN_DS;
    constexpr int NK = KOG_ATTN_NK;           // k-steps of S^T
    constexpr int NM = NK / DS;               // m-tiles of O^T a warp (its 16 NM dims)
    constexpr int NT = KOG_ATTN_NT;           // 8-head n-tiles
    const int t = c.t;
    const int jc1 = min(j1, t);
    const int lane = threadIdx.x % KOG_WARP, warp = threadIdx.x / KOG_WARP;
    const int grp = warp % NWA, ds = warp / NWA;  // this warp's group, its share of the dims
    const int gid = lane >> 2, tig = lane & 3;  // mma fragment row group, column pair
    float* smem = kog_smem();
    const float* q = smem;                    // as laid out in kog_stage_attention
    const float* kv_t = smem + G * HD;
    float* o = smem + G * HD + 2 * HD;
    float* ml = o + G * HD;
    kog_u16* stage = reinterpret_cast<kog_u16*>(smem + KOG_ATTN_STAGE_OFFSET);
    kog_u16* gstage = stage + grp * NB * 2 * R * HD;
    const kog_u64 kv_base = (((kog_u64)layer * KOG_N_KV + g) * c.p->context_length) * HD;
    const kog_u16* kc = c.p->k_cache + kv_base;
    const kog_u16* vc = c.p->v_cache + kv_base;
    const float qs = rsqrtf((float)HD) * 1.4426950408889634f;  // scores in log2 units: exp2
    __syncthreads();                                          // q, kv_t (rounded) are published

    // q^T as the B operand of S^T (k = dim, n = head): b0 dims 2 tig + {0, 1}, b1 those + 8,
    // head gid of the n-tile; heads past G are 0
    kog_vec4* qf = reinterpret_cast<kog_vec4*>(smem + KOG_ATTN_QF_OFFSET);   // [NT][NK][lanes]
    for (int f = warp; f < NT * NK; f += KOG_THREADS / KOG_WARP) {
        const int nt = f / NK, kk = f - nt * NK, h = nt * 8 + gid;
        kog_u32 w[4];
#pragma unroll
        for (int b = 0; b < 2; ++b) {
            const int d = kk * 16 + b * 8 + 2 * tig;
            const float x0 = h < G ? q[h * HD + d] * qs : 0.f;
            const float x1 = h < G ? q[h * HD + d + 1] * qs : 0.f;
            kog_split_rn(x0, x1, w[b], w[2 + b]);
        }
        qf[f * KOG_WARP + lane] = kog_vec4{w[0], w[1], w[2], w[3]};
    }
    __syncthreads();
    // O^T accumulators (dims mt * 16 + gid (+ 8) x heads nt * 8 + 2 tig + {0, 1}); running max
    // and this lane's part of the sum for its two heads of each n-tile
    float acc[NT][NM][4], mx[NT][2], sm[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int mt = 0; mt < NM; ++mt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[nt][mt][e] = 0.f;
        mx[nt][0] = mx[nt][1] = KOG_NEG_INF;
        sm[nt][0] = sm[nt][1] = 0.f;
    }

    for (int a = j0, i = 0; a < j1; a += T, ++i) {
        kog_copy16_wait_groups<NB - 1>();                     // this lane's copies of tile i landed
        kog_attn_tile_sync();                                 // ... and the group's
        const int jg = a + grp * R;
        kog_u16* ks = gstage + (i % NB) * 2 * R * HD;
        kog_u16* vs = ks + R * HD;
        if (j1 == t + 1 && t >= a && t < a + T) {             // the tile holding position t:
            if (ds < DS && t >= jg && t < jg + R) {           // its row from kv_t (rounded)
                const int r = t - jg;
                for (int k = lane + ds * KOG_WARP; k < 2 * (HD / 8); k += DS * KOG_WARP) {
                    const int cv = k / (HD / 8), cc = k - cv * (HD / 8);
                    const float* src = kv_t + cv * HD + cc * 8;
                    kog_vec4 v;
                    KOG_V4_SET(v, 0, kog_pack_w(src[0], src[1]));
                    KOG_V4_SET(v, 1, kog_pack_w(src[2], src[3]));
                    KOG_V4_SET(v, 2, kog_pack_w(src[4], src[5]));
                    KOG_V4_SET(v, 3, kog_pack_w(src[6], src[7]));
                    *reinterpret_cast<kog_vec4*>((cv ? vs : ks) + r * HD + kog_attn_swz(r, cc) * 8) = v;
                }
            }
            kog_attn_tile_sync();
        }
        if (ds < DS && jg < j1) {
            // ---- S^T = K q^T: 16 positions x 8 heads an n-tile ----
            float s[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
            {
                const int mi = lane >> 3, r = (lane & 7) + (mi & 1) * 8;   // K tile mi: rows, dims
#pragma unroll
                for (int kk = 0; kk < NK; ++kk) {
                    kog_u32 ka[4];
                    kog_ldsm_x4(ka, kog_smem_addr(ks + r * HD + kog_attn_swz(r, 2 * kk + (mi >> 1)) * 8));
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        const kog_vec4 b = qf[(nt * NK + kk) * KOG_WARP + lane];
                        kog_mma_w(s[nt], ka, b.x, b.y);
                        kog_mma_w(s[nt], ka, b.z, b.w);
                    }
                }
            }
            // ---- online softmax: rows gid, gid + 8 are positions, columns 2 tig + {0, 1} heads ----
            const bool ok0 = jg + gid < j1, ok1 = jg + gid + 8 < j1;
            kog_u32 pb[NT][2][2];                             // P^T as B: [nt][b0/b1][hi/lo]
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                float p[4];
#pragma unroll
                for (int e = 0; e < 2; ++e) {                 // head 2 tig + e
                    const float s0 = ok0 ? s[nt][e] : KOG_NEG_INF;
                    const float s1 = ok1 ? s[nt][2 + e] : KOG_NEG_INF;
                    float gm = fmaxf(s0, s1);
#pragma unroll
                    for (int mk = 4; mk < KOG_WARP; mk <<= 1) gm = fmaxf(gm, kog_shfl_xor(gm, mk));
                    const float mn = fmaxf(mx[nt][e], gm);    // finite: row 0 of a group is in the chunk
                    const float alpha = kog_exp2(mx[nt][e] - mn);   // 0 while the max is -inf
                    mx[nt][e] = mn;
                    p[e] = kog_exp2(s0 - mn);
                    p[2 + e] = kog_exp2(s1 - mn);
                    sm[nt][e] = fmaf(sm[nt][e], alpha, p[e] + p[2 + e]);
#pragma unroll
                    for (int mt = 0; mt < NM; ++mt) {
                        acc[nt][mt][e] *= alpha;
                        acc[nt][mt][2 + e] *= alpha;
                    }
                }
                kog_u32 hi, lo;
                kog_split_rn(p[0], p[1], hi, lo);             // positions gid
                pb[nt][0][0] = kog_movmatrix_trans(hi);
                pb[nt][0][1] = kog_movmatrix_trans(lo);
                kog_split_rn(p[2], p[3], hi, lo);             // positions gid + 8
                pb[nt][1][0] = kog_movmatrix_trans(hi);
                pb[nt][1][1] = kog_movmatrix_trans(lo);
            }
            // ---- O^T += V^T P^T: 16 dims x 8 heads an m-tile, this warp's NM of them ----
            {
                const int mi = lane >> 3, r = (lane & 7) + (mi >> 1) * 8;  // V tile mi: rows, dims
#pragma unroll
                for (int mt = 0; mt < NM; ++mt) {
                    kog_u32 va[4];
                    kog_ldsm_x4_trans(va, kog_smem_addr(vs + r * HD + kog_attn_swz(r, 2 * (ds * NM + mt) + (mi & 1)) * 8));
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        kog_mma_w(acc[nt][mt], va, pb[nt][0][0], pb[nt][1][0]);
                        kog_mma_w(acc[nt][mt], va, pb[nt][0][1], pb[nt][1][1]);
                    }
                }
            }
        }
        kog_attn_tile_sync();                                 // the group is done with buffer i % NB
        kog_attn_stage_tile(kc, vc, stage, a + NB * T, jc1, j1, i + NB);
    }

    // This warp's state (its dims of the G heads; the sum reduced over the lanes of a head)
    // into o_at[h * so + dim] and ml_at[h * sml + {0, 1}] = (max * m_scale, sum).
    auto store_state = [&](float* o_at, int so, float* ml_at, int sml, float m_scale) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                float l = sm[nt][e];
#pragma unroll
                for (int mk = 4; mk < KOG_WARP; mk <<= 1) l += kog_shfl_xor(l, mk);
                const int h = nt * 8 + 2 * tig + e;
                if (h < G) {
#pragma unroll
                    for (int mt = 0; mt < NM; ++mt) {
                        o_at[h * so + (ds * NM + mt) * 16 + gid] = acc[nt][mt][e];
                        o_at[h * so + (ds * NM + mt) * 16 + gid + 8] = acc[nt][mt][2 + e];
                    }
                    if (gid == 0 && ds == 0) {
                        ml_at[h * sml] = mx[nt][e] * m_scale;
                        ml_at[h * sml + 1] = l;
                    }
                }
            }
        }
    };
    // ---- a chunk of one group: group 0's warps hold the whole state and write it as the
    //      partial (what the merge would give: the other groups are empty), no merge ----
    if (j1 - j0 <= R) {
        if (grp == 0 && ds < DS) store_state(o, HD, ml, 2, 0.6931471805599453f);
        __syncthreads();                                      // o, ml are the unit's partial
        return;
    }
    // ---- merge: each group's state [G][HD + 2] (acc, max, sum) to its own staging area (its
    //      copies are done: the groups still open are empty; its warps are past their last
    //      barrier), then the groups ----
    float* ws = reinterpret_cast<float*>(gstage);
    static_assert(G * (HD + 2) <= NB * R * HD,
                  "a group's merged state fits its staging area (build_plan.attn_tile_problem)");
    if (ds < DS) store_state(ws, HD + 2, ws + HD, HD + 2, 1.f);
    __syncthreads();
    kog_attn_merge_states(NWA, NB * R * HD, o, ml);
}

#else  // !KOG_ATTN_MMA: a lane holds 8 dims of one head

// Thread layout of a unit's chunk: a lane holds 8 dims (one 16-byte K / V piece) of one q head
// at one position; LPP = HD / 8 lanes cover a head, HG heads (HGP slots, a power of two) a
// position, PPR positions side by side in a warp; a unit's G heads are NHS sets of HG. Each
// warp owns PW consecutive positions of every tile and stages, waits for and consumes them on
// its own (no block barrier per tile).
#define KOG_ATTN_LPP (KOG_HEAD_DIM / 8)
#define KOG_ATTN_NW (KOG_THREADS / KOG_WARP)
#define KOG_ATTN_PW (KOG_ATTN_TILE / KOG_ATTN_NW)
#define KOG_ATTN_HG (KOG_GQA < KOG_WARP / KOG_ATTN_LPP ? KOG_GQA : KOG_WARP / KOG_ATTN_LPP)
#define KOG_ATTN_HGP (KOG_ATTN_HG <= 1 ? 1 : KOG_ATTN_HG <= 2 ? 2 : KOG_ATTN_HG <= 4 ? 4 : \
                      KOG_ATTN_HG <= 8 ? 8 : 16)
#define KOG_ATTN_PPR (KOG_WARP / (KOG_ATTN_LPP * KOG_ATTN_HGP))
#define KOG_ATTN_NHS ((KOG_GQA + KOG_ATTN_HG - 1) / KOG_ATTN_HG)
// After the staging area: with several head sets, the saved state of each lane's sets.
#define KOG_ATTN_SAVED_OFFSET (KOG_ATTN_STAGE_OFFSET + KOG_ATTN_BUFS * KOG_ATTN_TILE * KOG_HEAD_DIM)
#define KOG_ATTN_SMEM_FLOATS \
    (KOG_ATTN_SAVED_OFFSET + (KOG_ATTN_NHS > 1 ? KOG_ATTN_NHS * 10 * KOG_THREADS : 0))
// Position of row `r` of warp `w`'s slice of the tile at a: the warps take turns by groups of
// PPR positions, so that a short chunk still spreads over every warp.
KOG_DEVICE int kog_attn_pos(int a, int w, int r) {
    return a + ((r / KOG_ATTN_PPR) * KOG_ATTN_NW + w) * KOG_ATTN_PPR + r % KOG_ATTN_PPR;
}
static_assert(KOG_HEAD_DIM % 8 == 0 && KOG_WARP % KOG_ATTN_LPP == 0 &&
              (KOG_ATTN_LPP & (KOG_ATTN_LPP - 1)) == 0,
              "attention: HD / 8 lanes per head must divide the warp");
static_assert(KOG_ATTN_TILE % KOG_ATTN_NW == 0 && KOG_ATTN_PW % (KOG_WARP / KOG_ATTN_LPP) == 0,
              "attention: a tile is a whole number of warp rounds (tile % (threads * 8 / HD) == 0)");

// This warp's cached K/V rows of tile i (rows r -> positions kog_attn_pos(a, warp, r) below
// jc1; kc, vc: the (layer, kv head) rows of the caches) into its staging buffer i % BUFS (K
// then V), as one commit group, empty or not: "at most BUFS - 1 groups in flight" then means
// the warp's part of tile i has landed.
KOG_DEVICE void kog_attn_stage_tile(const kog_u16* kc, const kog_u16* vc, kog_u16* stage, int a,
                                    int jc1, int j1, int i) {
    constexpr int HD = KOG_HEAD_DIM, PW = KOG_ATTN_PW, P16 = HD / 8;
    const int lane = threadIdx.x % KOG_WARP, warp = threadIdx.x / KOG_WARP;
    kog_u16* ks = stage + (warp * KOG_ATTN_BUFS + i % KOG_ATTN_BUFS) * 2 * PW * HD;
    if (kog_attn_pos(a, warp, 0) < jc1) {
        for (int k = lane; k < PW * P16; k += KOG_WARP) {
            const int r = k / P16;
            const int j = kog_attn_pos(a, warp, r);
            if (j < jc1) {
                const kog_u64 src = (kog_u64)j * HD + (k - r * P16) * 8;
                kog_copy16(ks + k * 8, kc + src);
                kog_copy16(ks + PW * HD + k * 8, vc + src);
            }
        }
    }
    kog_copy16_commit();
}

// The unit's chunk [j0, j1) (its first BUFS tiles already staged; q, k / v of position t in
// shared memory): fp32 softmax(q k^T / sqrt(hd)) v for the G heads, left in shared memory as
// o (unnormalised) and ml (running max, sum), the state the combine merges.
// Every lane keeps an online-softmax state (max, sum, its 8 dims of o) per head set in
// registers across all tiles; at the end the position slots of a warp merge by shuffles and
// the warps through shared memory. A small state on purpose: the function is not inlined (the
// monokernel sits at the register ceiling: ptxas spilled in the GEMV loops when the attention
// was inlined, -13% decode on Llama-3.2-1B, H200) and every register it uses is one fewer for
// the caller's values that live across the call.
__device__ __noinline__ void kog_attn_chunk(const KogCtx& c, int layer, int g, int j0, int j1) {
    constexpr int HD = KOG_HEAD_DIM, G = KOG_GQA, T = KOG_ATTN_TILE, NB = KOG_ATTN_BUFS;
    constexpr int LPP = KOG_ATTN_LPP, PW = KOG_ATTN_PW, NW = KOG_ATTN_NW;
    constexpr int HG = KOG_ATTN_HG, HGP = KOG_ATTN_HGP;                 // heads per set (slots)
    constexpr int NHS = KOG_ATTN_NHS;                                   // head sets
    constexpr int PPR = KOG_ATTN_PPR;                                   // positions per round
    constexpr int PR = 2 < PW / PPR ? 2 : PW / PPR;                     // positions a lane per round
    static_assert(HGP >= HG && LPP * HGP <= KOG_WARP && PW % (PPR * PR) == 0,
                  "attention lane layout (build_plan.attn_tile_problem mirrors it)");
    const int t = c.t;
    const int jc1 = min(j1, t);
    const int lane = threadIdx.x % KOG_WARP, warp = threadIdx.x / KOG_WARP;
    const int sub = lane % LPP, hl = (lane / LPP) % HGP, slot = lane / (LPP * HGP);
    float* smem = kog_smem();                                 // (== c.smem, known to be shared)
    const float* q = smem;                                    // as laid out in kog_stage_attention
    float* kv_t = smem + G * HD;
    float* o = kv_t + 2 * HD;
    float* ml = o + G * HD;
    kog_u16* stage = reinterpret_cast<kog_u16*>(smem + KOG_ATTN_STAGE_OFFSET);
    kog_u16* wstage = stage + warp * NB * 2 * PW * HD;
    float* saved = smem + KOG_ATTN_SAVED_OFFSET;              // [NHS][10][threads] (NHS > 1)
    // (kog_stage_attention has these pointers too; recomputed here, not passed: passing them
    // made ptxas spill more in the caller)
    const kog_u64 kv_base = (((kog_u64)layer * KOG_N_KV + g) * c.p->context_length) * HD;
    const kog_u16* kc = c.p->k_cache + kv_base;
    const kog_u16* vc = c.p->v_cache + kv_base;
    const float qs = rsqrtf((float)HD) * 1.4426950408889634f;  // scores in log2 units: exp2
    __syncthreads();                                          // q, kv_t (rounded) are published

    // One head set's online-softmax state in registers; with several sets (G > HG) the others
    // wait in shared memory, each lane its own words, while a tile is run set by set.
    float m = KOG_NEG_INF, l = 0.f, acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = 0.f;
    auto save = [&](int hs) {
        float* sv = saved + hs * 10 * KOG_THREADS + threadIdx.x;
#pragma unroll
        for (int e = 0; e < 8; ++e) sv[e * KOG_THREADS] = acc[e];
        sv[8 * KOG_THREADS] = m;
        sv[9 * KOG_THREADS] = l;
    };
    auto restore = [&](int hs) {
        const float* sv = saved + hs * 10 * KOG_THREADS + threadIdx.x;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = sv[e * KOG_THREADS];
        m = sv[8 * KOG_THREADS];
        l = sv[9 * KOG_THREADS];
    };
    if (NHS > 1)
        for (int hs = 1; hs < NHS; ++hs) save(hs);            // (the initial state)

    for (int a = j0, i = 0; a < j1; a += T, ++i) {
        kog_copy16_wait_groups<NB - 1>();                     // this lane's copies of tile i landed
        kog_syncwarp();                                       // ... and the warp's
        const kog_u16* ks = wstage + (i % NB) * 2 * PW * HD;
        const kog_u16* vs = ks + PW * HD;
        for (int hs = 0; hs < NHS; ++hs) {
            if (NHS > 1 && (i > 0 || hs > 0)) restore(hs);
            // q of this lane's head, 8 dims, read from shared memory every round (registers are
            // scarcer here than shared-memory bandwidth); an idle slot reads head 0
            const int h = hs * HG + hl;
            const float* qp = q + (hl < HG && h < G ? h : 0) * HD + sub * 8;
            for (int r = 0; r < PW && kog_attn_pos(a, warp, r) < j1; r += PPR * PR) {
                // PR positions a lane at once (independent dot products in flight); K and V
                // pieces stay packed (storage dtype) until used: fewer live registers
                kog_vec4 kv[PR], vv[PR];
                int jj[PR];
#pragma unroll
                for (int pp = 0; pp < PR; ++pp) {
                    const int jr = r + pp * PPR + slot, j = kog_attn_pos(a, warp, jr);
                    jj[pp] = j;
                    kv[pp] = vv[pp] = kog_vec4{};
                    if (j == t) {
                        const float* kt = kv_t + sub * 8;
#pragma unroll
                        for (int e = 0; e < 4; ++e) {          // (kv_t holds storage-rounded values)
                            KOG_V4_SET(kv[pp], e, kog_pack_w(kt[2 * e], kt[2 * e + 1]));
                            KOG_V4_SET(vv[pp], e, kog_pack_w(kt[HD + 2 * e], kt[HD + 2 * e + 1]));
                        }
                    } else if (j < j1) {
                        kv[pp] = *reinterpret_cast<const kog_vec4*>(ks + jr * HD + sub * 8);
                        vv[pp] = *reinterpret_cast<const kog_vec4*>(vs + jr * HD + sub * 8);
                    }
                }
                const float4 qa = *reinterpret_cast<const float4*>(qp);
                const float4 qb = *reinterpret_cast<const float4*>(qp + 4);
                float d[PR];
                float mx = KOG_NEG_INF;
#pragma unroll
                for (int pp = 0; pp < PR; ++pp) {
                    float x = qa.x * kog_w_lo(KOG_V4(kv[pp], 0));
                    x = fmaf(qa.y, kog_w_hi(KOG_V4(kv[pp], 0)), x);
                    x = fmaf(qa.z, kog_w_lo(KOG_V4(kv[pp], 1)), x);
                    x = fmaf(qa.w, kog_w_hi(KOG_V4(kv[pp], 1)), x);
                    x = fmaf(qb.x, kog_w_lo(KOG_V4(kv[pp], 2)), x);
                    x = fmaf(qb.y, kog_w_hi(KOG_V4(kv[pp], 2)), x);
                    x = fmaf(qb.z, kog_w_lo(KOG_V4(kv[pp], 3)), x);
                    x = fmaf(qb.w, kog_w_hi(KOG_V4(kv[pp], 3)), x);
                    d[pp] = x;
                }
#pragma unroll
                for (int mk = LPP / 2; mk > 0; mk >>= 1) {
#pragma unroll
                    for (int pp = 0; pp < PR; ++pp) d[pp] += kog_shfl_xor(d[pp], mk);
                }
#pragma unroll
                for (int pp = 0; pp < PR; ++pp) {
                    d[pp] *= qs;
                    if (jj[pp] < j1) mx = fmaxf(mx, d[pp]);
                }
                if (mx > m) {                                 // a new max: rescale (rare after the start)
                    const float alpha = kog_exp2(m - mx);     // 0 while m is -inf
                    l *= alpha;
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[e] *= alpha;
                    m = mx;
                }
#pragma unroll
                for (int pp = 0; pp < PR; ++pp) {
                    if (jj[pp] < j1) {
                        const float pr = kog_exp2(d[pp] - m);
                        l += pr;
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            acc[2 * e] = fmaf(pr, kog_w_lo(KOG_V4(vv[pp], e)), acc[2 * e]);
                            acc[2 * e + 1] = fmaf(pr, kog_w_hi(KOG_V4(vv[pp], e)), acc[2 * e + 1]);
                        }
                    }
                }
            }
            if (NHS > 1) save(hs);
        }
        kog_syncwarp();                                       // the warp is done with buffer i % NB
        kog_attn_stage_tile(kc, vc, stage, a + NB * T, jc1, j1, i + NB);
    }

    // ---- merge: the position slots of a warp (shuffles), then the warps (shared memory); the
    //      warp's state [G][HD + 2] (acc, max, sum) goes to its own staging area (its copies
    //      are done: the groups still open are empty) ----
    float* ws = reinterpret_cast<float*>(wstage);
    static_assert(G * (HD + 2) <= NB * PW * HD,
                  "a warp's merged state fits its staging area (build_plan.attn_tile_problem)");
    for (int hs = 0; hs < NHS; ++hs) {
        if (NHS > 1) restore(hs);
#pragma unroll
        for (int mk = LPP * HGP; mk < KOG_WARP; mk <<= 1) {
            const float mo = kog_shfl_xor(m, mk), lo = kog_shfl_xor(l, mk);
            const float mn = fmaxf(m, mo);
            const float fa = m > KOG_NEG_INF ? kog_exp2(m - mn) : 0.f;
            const float fb = mo > KOG_NEG_INF ? kog_exp2(mo - mn) : 0.f;
            l = l * fa + lo * fb;
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] = acc[e] * fa + kog_shfl_xor(acc[e], mk) * fb;
            m = mn;
        }
        const int h = hs * HG + hl;
        if (slot == 0 && hl < HG && h < G) {
#pragma unroll
            for (int e = 0; e < 8; ++e) ws[h * (HD + 2) + sub * 8 + e] = acc[e];
            if (sub == 0) { ws[h * (HD + 2) + HD] = m; ws[h * (HD + 2) + HD + 1] = l; }
        }
    }
    __syncthreads();
    kog_attn_merge_states(NW, NB * PW * HD, o, ml);
}

#endif  // KOG_ATTN_MMA

// One partial (max mk in natural units, sum lk, output values ok[P] of P dims of one head)
// merged into a running (m, l, acc[P]) of the same head and dims.
template <int P>
KOG_DEVICE void kog_attn_merge_one(float& m, float& l, float (&acc)[P], float mk, float lk, const float (&ok)[P]) {
    const float mn = fmaxf(m, mk);
    const float a = expf(m - mn), e = expf(mk - mn);
    l = fmaf(l, a, lk * e);
#pragma unroll
    for (int j = 0; j < P; ++j) acc[j] = fmaf(acc[j], a, ok[j] * e);
    m = mn;
}
// Head group g's attention output from the chunk partials [0, n_parts) of attn_partial
// (tagged `tag`; a chunk's [G][HD + 2]: unnormalised o, max in natural units, sum), merged
// with the caller's own partial when own_o is set (o [G][HD], ml [G][2] in shared memory).
// A thread holds KOG_ATTN_COMBINE_P adjacent dims of one head (one 16-byte load of a partial's
// o words when 2); the block's threads form KOG_ATTN_COMBINE_S groups of G HD / P threads,
// group s merging batches s, s + S, ... of B partials, so that a long context's partials are
// in flight together instead of in ceil(C / B) rounds; groups s > 0 leave (max, sum, acc) in
// `stash` (3 (S - 1) G HD floats of shared memory) and group 0 merges them in group order and
// calls out(h * HD + d, value). Every thread of the block calls it.
template <class Out>
KOG_DEVICE void kog_attn_combine(const KogParams* p, int g, int n_parts, const float* own_o,
                                 const float* own_ml, kog_u32 tag, float* stash, Out out) {
    constexpr int HD = KOG_HEAD_DIM, GH = KOG_GQA * HD, S = KOG_ATTN_COMBINE_S;
    constexpr int P = KOG_ATTN_COMBINE_P, GT = GH / P;     // dims a thread, threads a group
    static_assert((P == 1 || P == 2) && HD % P == 0, "the combine's dims a thread: 1 or 2 (16-byte loads)");
    constexpr int B = KOG_ATTN_COMBINE_B;         // partials in flight per thread
    constexpr int W = KOG_GQA * (HD + 2);         // words per chunk
    const kog_u64* pbase = reinterpret_cast<const kog_u64*>(p->attn_partial) +
                           (kog_u64)g * p->attn_chunks_alloc * W;
    auto load_o = [](const kog_u64* q, kog_u64 (&w)[P]) {
        if constexpr (P == 2) kog_ld_tagged2(q, w[0], w[1]);
        else w[0] = kog_ld_tagged(q);
    };
    for (int i0 = 0; i0 < GT * S; i0 += blockDim.x) {
        const int ti = i0 + threadIdx.x;
        const int grp = ti / GT, i = (ti - grp * GT) * P;
        const int h = i / HD, d = i - h * HD;
        float m = KOG_NEG_INF, l = 0.f, acc[P];
#pragma unroll
        for (int j = 0; j < P; ++j) acc[j] = 0.f;
        if (grp == 0 && own_o != nullptr) {
            m = own_ml[2 * h]; l = own_ml[2 * h + 1];
#pragma unroll
            for (int j = 0; j < P; ++j) acc[j] = own_o[i + j];
        }
        const kog_u64* ph = pbase + h * (HD + 2);          // (max, sum) 16-byte aligned
        for (int k0 = grp * B; grp < S && k0 < n_parts; k0 += S * B) {
            const int nb = min(B, n_parts - k0);
            const kog_u64* pk = ph + (kog_u64)k0 * W;
            kog_u64 wm[B], wl[B], wo[B][P];
#pragma unroll
            for (int b = 0; b < B; ++b) {
                wm[b] = wl[b] = (kog_u64)tag << 32;
#pragma unroll
                for (int j = 0; j < P; ++j) wo[b][j] = (kog_u64)tag << 32;
                if (b < nb) {
                    kog_ld_tagged2(pk + b * W + HD, wm[b], wl[b]);
                    load_o(pk + b * W + d, wo[b]);
                }
            }
            for (;;) {
                bool ready = true;
#pragma unroll
                for (int b = 0; b < B; ++b) {
                    if (kog_tag_of(wm[b]) != tag || kog_tag_of(wl[b]) != tag) {
                        ready = false;
                        kog_ld_tagged2(pk + b * W + HD, wm[b], wl[b]);
                    }
                    bool o_ready = true;
#pragma unroll
                    for (int j = 0; j < P; ++j) o_ready = o_ready && kog_tag_of(wo[b][j]) == tag;
                    if (!o_ready) { ready = false; load_o(pk + b * W + d, wo[b]); }
                }
                if (ready) break;
            }
#pragma unroll
            for (int b = 0; b < B; ++b) {
                if (b < nb) {
                    float ok[P];
#pragma unroll
                    for (int j = 0; j < P; ++j) ok[j] = kog_value_of(wo[b][j]);
                    kog_attn_merge_one<P>(m, l, acc, kog_value_of(wm[b]), kog_value_of(wl[b]), ok);
                }
            }
        }
        if (grp > 0 && grp < S) {
            float* st = stash + (grp - 1) * 3 * GH;
#pragma unroll
            for (int j = 0; j < P; ++j) { st[i + j] = m; st[GH + i + j] = l; st[2 * GH + i + j] = acc[j]; }
        }
        if (S > 1) __syncthreads();
        if (grp == 0) {
            for (int s2 = 1; s2 < S; ++s2) {
                const float* st = stash + (s2 - 1) * 3 * GH;
                const float mk = st[i];
                if (!(mk > KOG_NEG_INF)) continue;          // that group had no partials
                float ok[P];
#pragma unroll
                for (int j = 0; j < P; ++j) ok[j] = st[2 * GH + i + j];
                kog_attn_merge_one<P>(m, l, acc, mk, st[GH + i], ok);
            }
#pragma unroll
            for (int j = 0; j < P; ++j) out(i + j, acc[j] / l);
        }
        if (S > 1) __syncthreads();
    }
}

KOG_DEVICE void kog_stage_attention(const KogCtx& c, int layer) {
    constexpr int HD = KOG_HEAD_DIM, G = KOG_GQA, T = KOG_ATTN_TILE, NB = KOG_ATTN_BUFS;
    static_assert(NB >= 1 && NB <= 4, "1-4 staged tiles (their size: KOG_ATTN_PW's asserts)");
    const KogParams* p = c.p;
    const int t = c.t, n_pos = t + 1;
    const int chunk = kog_attn_chunk_len_now(c);
    const int n_chunks = kog_attn_n_chunks(n_pos, chunk);
    const int n_units = KOG_N_KV * n_chunks;
    const int warp = threadIdx.x / KOG_WARP;
    const int n_warps = blockDim.x / KOG_WARP;
    float* q = c.smem;                          // [G][HD]
    float* kv_t = q + G * HD;                   // [2][HD] k, v of the current position
    float* o = kv_t + 2 * HD;                   // [G][HD] the unit's partial (kog_attn_chunk); from
                                                // q's wait to the qk-norm's end, o[0, 2 HD) holds
                                                // the q and k gammas (GAMMA_SMEM, below)
    float* ml = o + G * HD;                     // [G][2] its max, sum
    float* rope = ml + KOG_ATTN_ML_FLOATS;      // [HD] cos, sin of position t (half each)
    kog_u16* stage = reinterpret_cast<kog_u16*>(rope + HD);   // [warp][NB][K, V][PW][HD]
    static_assert(KOG_ATTN_STAGE_OFFSET == G * HD * 2 + 2 * HD + KOG_ATTN_ML_FLOATS + HD &&
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
    // For the same reason the unit holding t signals its head's count only when the next step
    // will poll it (this step runs no LM head): the signal's release waits for the block's
    // partial stores, and that wait would delay the block's next stage.
    auto lm_orders = [&](int s) {
        return KOG_TP == 1 && (p->all_logits || s >= p->prompt_len - 1) &&
               p->n_lm_producers == (int)gridDim.x;
    };
    const bool kv_ordered = t > 0 && lm_orders(t - 1);
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
        for (int i = 0; i < NB; ++i) kog_attn_stage_tile(kc, vc, stage, j0 + i * T, jc1, j1, i);
        // the RoPE row goes to registers now and to shared memory after the polls below, so
        // that its round trip overlaps theirs (a poll orders every earlier memory access)
        static_assert(HD <= KOG_THREADS, "one RoPE value per thread");
        float rope_v = 0.f;
        if (threadIdx.x < HD)
            rope_v = threadIdx.x < HD / 2 ? p->rope_cos[(kog_u64)t * (HD / 2) + threadIdx.x]
                                          : p->rope_sin[(kog_u64)t * (HD / 2) + threadIdx.x - HD / 2];
        // so do the qk-norm gammas (q's then k's, to shared memory in o's space, which is free
        // until the chunk's end): their round trip is then not on the path after q's wait.
        // (One q head a kv head: o has room for one gamma only; the norm reads global memory.)
        constexpr bool GAMMA_SMEM = KOG_QK_NORM && G >= 2 && 2 * HD <= KOG_THREADS;
        const float* qn = KOG_QK_NORM ? p->q_norm + (kog_u64)layer * HD : nullptr;
        const float* kn = KOG_QK_NORM ? p->k_norm + (kog_u64)layer * HD : nullptr;
        const float* q_gamma = GAMMA_SMEM ? o : qn;          // where the norm reads them
        const float* k_gamma = GAMMA_SMEM ? o + HD : kn;
        float gamma_v = 0.f;
        if (GAMMA_SMEM && threadIdx.x < 2 * HD)
            gamma_v = threadIdx.x < HD ? qn[threadIdx.x] : kn[threadIdx.x - HD];

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
        if (GAMMA_SMEM && threadIdx.x < 2 * HD) o[threadIdx.x] = gamma_v;
        __syncthreads();
        kog_prof(c, layer * 16 + 4);
        for (int h = warp; h < G + (holds_t ? 1 : 0); h += n_warps)
            kog_head_norm_rope(h < G ? q + h * HD : kv_t, h < G ? q_gamma : k_gamma, rope);
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
        kog_prof(c, layer * 16 + 15);
        kog_attn_chunk(c, layer, g, j0, j1);

        // ---- finish: one GPU, every unit writes its partial as tagged words and o_proj's items
        //      merge their head group's (kog_attn_combine); tensor parallel, every other chunk
        //      writes its partial and the unit holding t (the last chunk, the last unit of its
        //      block: no wait cycle) merges them with its own into attn_out ----
#if KOG_TP > 1
        const bool combine = n_chunks == 1 || holds_t;
#else
        constexpr bool combine = false;
#endif
        static_assert(3 * (KOG_ATTN_COMBINE_S - 1) * G * HD <= NB * T * HD,
                      "the combine's stash fits the K/V staging area (build_plan.attn_tile_problem; "
                      "it also bounds o_proj's stash)");
        if (combine) {
            kog_attn_combine(p, g, n_chunks - 1, o, ml, out_tag, reinterpret_cast<float*>(stage),
                             [&](int i, float v) {
                kog_st_tagged(p->attn_out + g * G * HD + i, v, out_tag);
                if (dbg != nullptr) dbg[KOG_DBG_ATTENTION + (kog_u64)layer * KOG_DBG_LAYER + g * G * HD + i] = v;
            });
        } else {
            kog_u64* part = reinterpret_cast<kog_u64*>(p->attn_partial) +
                            ((kog_u64)g * p->attn_chunks_alloc + ch) * G * (HD + 2);
            for (int i = threadIdx.x; i < G * (HD + 2); i += blockDim.x) {
                const int h = i / (HD + 2), k = i - h * (HD + 2);
                kog_st_tagged(part + i, k < HD ? o[h * HD + k] : ml[2 * h + (k - HD)], out_tag);
            }
        }
        if (holds_t && !lm_orders(t)) kog_signal_counter(kv_count);   // position t of head g is cached
        else __syncthreads();                     // shared buffers are reused by the next unit
    }
    kog_prof(c, layer * 16 + 5);
}
