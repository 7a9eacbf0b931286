// ============================================================================================
// prefill_attention.cuh -- causal attention for a chunk of n prompt tokens (positions
// pos0 .. pos0+n-1) over every cached position and the chunk itself, reading K/V from the
// monokernel's cache (this layer's (KV, C, hd) slice, already holding the chunk's rows). pos0
// comes from device memory, so that one captured graph of a chunk serves every position.
//
// kog_pf_attention (CUDA, sm_80+): flash-attention tiles on tensor cores. A block of 4 warps
// takes KOG_PF_BM = 128 queries of one q head (staged in shared memory once); each warp owns 32
// query rows (two m16 tiles, so that every K / V fragment it loads from shared memory feeds two
// products) and walks the key tiles of KOG_PF_BN positions (64; 32 at head_dim 128, for
// registers) up to its last query: S = Q K^T with mma.m16n8k16 (bf16/fp16 in, fp32
// accumulate), causal mask (diagonal tiles only), online softmax in fp32 (running max in raw
// score units and sum per row, exp2 with the scale folded into its FFMA), then O += P V with P
// re-packed from the S accumulators into A fragments (the accumulator layout of two n8 tiles is
// the A layout of one k16 step), so P never leaves registers. K and V tiles stream into shared
// memory by cp.async, two stages (the next tile loads while this one is used), with a row
// stride of hd + 8 elements so that the ldmatrix fragment loads (Q and K as they are, V
// transposed) are free of bank conflicts.
// Heaviest query tiles are scheduled first. The tile sizes come from prefill.py (its defines).
//
// kog_pf_attention_ws (Hopper, sm_90a builds: KOG_WGMMA, head_dim 64 / 128): the same tiles on
// warpgroup products (wgmma), warp-specialised: one warpgroup copies, two or three compute 64
// queries each; Q and the K / V tiles in 128-byte-swizzled shared memory read by the products
// themselves (no fragment loads), P from registers. prefill.py uses it wherever it compiles;
// kog_pf_attention elsewhere (sm_80+).
//
// kog_pf_attention_simple (any platform, any head_dim): one warp per (query, q head), keys one
// by one with an online softmax. The HIP build uses it (an MFMA version is future work) and it
// is the oracle the tensor-core kernel is tested against besides the NumPy reference.
//
// q (n, H, hd) and out (n, H * hd) are in the storage dtype; scale_log2 = log2(e) / sqrt(hd).
// ============================================================================================
#pragma once

#define KOG_PF_KSTRIDE (KOG_HEAD_DIM + 8)
#define KOG_PF_WARPS 4
#define KOG_PF_MT 2               // m16 tiles of query rows a warp

#if defined(KOG_CUDA) && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800)
#define KOG_PF_MMA (KOG_HEAD_DIM % 16 == 0 && KOG_HEAD_DIM <= 128)   // registers: o and s fragments
#else
#define KOG_PF_MMA 0
#endif

#if KOG_PF_MMA || defined(KOG_WGMMA)
// The mma.sync kernel's tile loop: tile kt + 1 into the other stage (`load(stage, key0)`
// issues and commits its copies) while this thread's copies of tile kt are waited for.
template <class Load>
KOG_DEVICE void kog_pf_stage_next(int kt, int n_tiles, int bn, const Load& load) {
    if (kt + 1 < n_tiles) {
        load((kt & 1) ^ 1, (kt + 1) * bn);
        kog_cp_async_wait<1>();
    } else {
        kog_cp_async_wait<0>();
    }
}

// One row pair (rows r, r + 8 of an m16 accumulator tile, NT n8 tiles of keys from key0): the
// causal mask where `diagonal` (a key past the row's position scores -inf), then the online
// softmax step: maxima in raw score units, the scale folded into each exponent's FFMA, s
// replaced by its exponents, m / l updated; al_a / al_b rescale the rows' earlier outputs.
template <int NT>
KOG_DEVICE void kog_pf_softmax_rows(float (&s)[NT][4], bool diagonal, int key0, int cq,
                                    int qpos_a, int qpos_b, float scale_log2, float& m_a,
                                    float& m_b, float& l_a, float& l_b, float& al_a, float& al_b) {
    if (diagonal) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                if (key0 + nt * 8 + 2 * cq + (e & 1) > (e < 2 ? qpos_a : qpos_b)) s[nt][e] = KOG_NEG_INF;
    }
    float mx_a = KOG_NEG_INF, mx_b = KOG_NEG_INF;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        mx_a = fmaxf(mx_a, fmaxf(s[nt][0], s[nt][1]));
        mx_b = fmaxf(mx_b, fmaxf(s[nt][2], s[nt][3]));
    }
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
    // (finite: every row has key 0 in tile 0, which every warp runs)
    const float sa = fmaxf(m_a, mx_a), sb = fmaxf(m_b, mx_b);
    const float na = -sa * scale_log2, nb = -sb * scale_log2;
    al_a = kog_exp2(fmaf(m_a, scale_log2, na));                // 0 at -inf
    al_b = kog_exp2(fmaf(m_b, scale_log2, nb));
    m_a = sa; m_b = sb;
    float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        s[nt][0] = kog_exp2(fmaf(s[nt][0], scale_log2, na));
        s[nt][1] = kog_exp2(fmaf(s[nt][1], scale_log2, na));
        s[nt][2] = kog_exp2(fmaf(s[nt][2], scale_log2, nb));
        s[nt][3] = kog_exp2(fmaf(s[nt][3], scale_log2, nb));
        sum_a += s[nt][0] + s[nt][1];
        sum_b += s[nt][2] + s[nt][3];
    }
    l_a = l_a * al_a + sum_a;                                  // per-lane partial row sums
    l_b = l_b * al_b + sum_b;
}

// P (16 keys: accumulator tiles 2 kk, 2 kk + 1) as the A fragment of the next product
template <int NT>
KOG_DEVICE void kog_pf_pack_p(const float (&s)[NT][4], int kk, kog_u32 (&pa)[4]) {
    pa[0] = kog_pack_rn(s[2 * kk][0], s[2 * kk][1]);
    pa[1] = kog_pack_rn(s[2 * kk][2], s[2 * kk][3]);
    pa[2] = kog_pack_rn(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    pa[3] = kog_pack_rn(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// the row pair's output accumulators (DT n8 tiles of head dims) rescaled
template <int DT>
KOG_DEVICE void kog_pf_rescale(float (&o)[DT][4], float al_a, float al_b) {
#pragma unroll
    for (int i = 0; i < DT; ++i) {
        o[i][0] *= al_a; o[i][1] *= al_a; o[i][2] *= al_b; o[i][3] *= al_b;
    }
}

// the row pair's outputs divided by their sums (the quad's partial sums added), stored in the
// storage dtype at rows row_a, row_a + 8 of head h where they are inside the chunk
template <int DT>
KOG_DEVICE void kog_pf_store_rows(kog_u16* __restrict__ out, const float (&o)[DT][4], float l_a,
                                  float l_b, int row_a, int n, int h) {
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
    const float inv_a = 1.f / l_a, inv_b = 1.f / l_b;
    const int row_b = row_a + 8, cq = (threadIdx.x % 32) % 4;
#pragma unroll
    for (int dn = 0; dn < DT; ++dn) {
        const int col = h * KOG_HEAD_DIM + dn * 8 + 2 * cq;
        if (row_a < n)
            *reinterpret_cast<kog_u32*>(out + (kog_u64)row_a * KOG_PF_Q_DIM + col) =
                kog_pack_rn(o[dn][0] * inv_a, o[dn][1] * inv_a);
        if (row_b < n)
            *reinterpret_cast<kog_u32*>(out + (kog_u64)row_b * KOG_PF_Q_DIM + col) =
                kog_pack_rn(o[dn][2] * inv_b, o[dn][3] * inv_b);
    }
}
#endif

#if KOG_PF_MMA      // (tensor-core helpers: platform.cuh)
static_assert(KOG_PF_BM == KOG_PF_WARPS * KOG_PF_MT * 16 && KOG_PF_BN % 16 == 0,
              "prefill attention tiles: 16 KOG_PF_MT query rows a warp, keys in k16 steps "
              "(prefill.py ATTN_BM / ATTN_BN)");
// Dynamic shared memory: Q [BM][KS], then 2 stages x (K, V) x [BN][KS] (storage dtype);
// prefill.attn_smem_bytes mirrors it.
#define KOG_PF_SMEM_BYTES ((KOG_PF_BM + 2 * 2 * KOG_PF_BN) * KOG_PF_KSTRIDE * 2)

// (head_dim <= 64: three blocks an SM fit in registers, 168 a thread instead of 180)
extern "C" __global__ void __launch_bounds__(KOG_PF_WARPS * 32, KOG_HEAD_DIM <= 64 ? 3 : 1)
kog_pf_attention(const kog_u16* __restrict__ q,       // (n, H, hd)
                 const kog_u16* __restrict__ kc,      // (KV, C, hd) this layer
                 const kog_u16* __restrict__ vc,      // (KV, C, hd)
                 kog_u16* __restrict__ out,           // (n, H * hd)
                 int n, const int* __restrict__ chunk_pos0, int context_length,
                 float scale_log2) {
    const int pos0 = *chunk_pos0;                              // (device memory)
    constexpr int HD = KOG_HEAD_DIM, KS = KOG_PF_KSTRIDE, BM = KOG_PF_BM, BN = KOG_PF_BN;
    constexpr int MT = KOG_PF_MT, NT = BN / 8, DT = HD / 8;
    constexpr int TILE = BN * KS;                              // elements of one K or V tile
    extern __shared__ __align__(16) kog_u16 kog_pf_sm[];       // Q, then [stage][K, V][BN][KS]
    const int qt = gridDim.x - 1 - blockIdx.x;                 // heaviest tiles first
    const int h = blockIdx.y, g = h / KOG_PF_GQA;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int r = lane / 4, cq = lane % 4;
    const int wrow = warp * MT * 16;                           // the warp's first row in the block
    const int row0 = qt * BM + wrow;                           // ... in the chunk
    const int last_pos = pos0 + min(n, (qt + 1) * BM) - 1;     // block's last query
    const int warp_first = pos0 + row0, warp_last = warp_first + MT * 16 - 1;
    const kog_u16* kg = kc + (kog_u64)g * context_length * HD;
    const kog_u16* vg = vc + (kog_u64)g * context_length * HD;
    const unsigned sq = kog_smem_addr(kog_pf_sm);
    const unsigned skv = sq + 2u * (unsigned)(BM * KS);

    // K/V rows [key0, key0 + BN) into stage st; rows past last_pos are zeros
    auto load_tile = [&](int st, int key0) {
        for (int i = threadIdx.x; i < BN * (HD / 8); i += blockDim.x) {
            const int row = i / (HD / 8), col = (i - row * (HD / 8)) * 8;
            const bool ok = key0 + row <= last_pos;
            const kog_u64 off = (kog_u64)(ok ? key0 + row : 0) * HD + col;
            const unsigned dst = skv + 2u * (unsigned)(st * 2 * TILE + row * KS + col);
            kog_copy16_zfill(dst, kg + off, ok);
            kog_copy16_zfill(dst + 2u * TILE, vg + off, ok);
        }
        kog_cp_async_commit();
    };

    // the block's query rows of head h (rows past n: zeros, never written back), in tile 0's group
    for (int i = threadIdx.x; i < BM * (HD / 8); i += blockDim.x) {
        const int row = i / (HD / 8), col = (i - row * (HD / 8)) * 8;
        const bool ok = qt * BM + row < n;
        const kog_u64 off = ((kog_u64)(ok ? qt * BM + row : 0) * KOG_N_HEADS + h) * HD + col;
        kog_copy16_zfill(sq + 2u * (unsigned)(row * KS + col), q + off, ok);
    }
    float o[MT][DT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < DT; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
    float m_r[MT][2], l_r[MT][2];                              // rows r, r + 8 of each m-tile
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) m_r[mt][0] = m_r[mt][1] = KOG_NEG_INF, l_r[mt][0] = l_r[mt][1] = 0.f;

    const int n_tiles = last_pos / BN + 1;
    load_tile(0, 0);
    for (int kt = 0; kt < n_tiles; ++kt) {
        const int key0 = kt * BN, st = kt & 1;
        kog_pf_stage_next(kt, n_tiles, BN, load_tile);         // the next tile streams in
        __syncthreads();
        if (key0 <= warp_last && row0 < n) {    // else: every key masked, or no row in the chunk
            const unsigned ks = skv + 2u * (unsigned)(st * 2 * TILE);
            const unsigned vs = ks + 2u * TILE;
            // ---- S = Q K^T (32 x BN per warp) ----
            float s[MT][NT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
            for (int k2 = 0; k2 < HD / 32; ++k2) {             // two k16 steps
                kog_u32 qa[MT][2][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int kh = 0; kh < 2; ++kh)
                        kog_ldsm_x4(qa[mt][kh], sq + 2u * (unsigned)((wrow + mt * 16 + (lane & 15)) * KS +
                                                                     k2 * 32 + kh * 16 + (lane >> 4) * 8));
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    kog_u32 b[4];
                    kog_ldsm_x4(b, ks + 2u * (unsigned)((nt * 8 + (lane & 7)) * KS + k2 * 32 + (lane >> 3) * 8));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        kog_mma_w(s[mt][nt], qa[mt][0], b[0], b[1]);
                        kog_mma_w(s[mt][nt], qa[mt][1], b[2], b[3]);
                    }
                }
            }
            if (HD % 32) {                                     // a last k16 step (hd = 16 mod 32)
                kog_u32 qa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
                    kog_ldsm_x4(qa[mt], sq + 2u * (unsigned)((wrow + mt * 16 + (lane & 15)) * KS +
                                                             (HD - 16) + (lane >> 4) * 8));
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const unsigned a = ks + 2u * (unsigned)((nt * 8 + r) * KS + (HD - 16) + 2 * cq);
                    kog_u32 b0, b1;
                    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(b0) : "r"(a));
                    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(b1) : "r"(a + 16u));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) kog_mma_w(s[mt][nt], qa[mt], b0, b1);
                }
            }
            // ---- causal mask (tiles that reach past the warp's first query only), online
            //      softmax (rows r, r + 8 of each m-tile) ----
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int qpos_a = warp_first + mt * 16 + r;
                float al_a, al_b;
                kog_pf_softmax_rows(s[mt], key0 + BN - 1 > warp_first, key0, cq, qpos_a, qpos_a + 8,
                                    scale_log2, m_r[mt][0], m_r[mt][1], l_r[mt][0], l_r[mt][1], al_a, al_b);
                kog_pf_rescale(o[mt], al_a, al_b);
            }
            // ---- O += P V: P's accumulators are the A fragments of the next product ----
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                kog_u32 pa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) kog_pf_pack_p(s[mt], kk, pa[mt]);
#pragma unroll
                for (int dp = 0; dp < DT / 2; ++dp) {
                    kog_u32 b[4];
                    const int key = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                    const int dim = dp * 16 + (lane >> 4) * 8;
                    kog_ldsm_x4_trans(b, vs + 2u * (unsigned)(key * KS + dim));
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        kog_mma_w(o[mt][2 * dp], pa[mt], b[0], b[1]);
                        kog_mma_w(o[mt][2 * dp + 1], pa[mt], b[2], b[3]);
                    }
                }
            }
        }
        __syncthreads();                                       // stage st is free again
    }
    // ---- normalize and store ----
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) kog_pf_store_rows(out, o[mt], l_r[mt][0], l_r[mt][1], row0 + mt * 16 + r, n, h);
}
#endif  // KOG_PF_MMA

#if defined(KOG_WGMMA)      // (warpgroup helpers: platform.cuh)
static_assert(KOG_HEAD_DIM == 64 || KOG_HEAD_DIM == 128, "kog_pf_attention_ws: head_dim 64 or 128");
// ---- warp-specialised blocks (kog_pf_attention_ws) ----------------------------------------
// Tiles (prefill.py WS_TILES, per head_dim): KOG_PFS_CWG computing warpgroups of 64 queries,
// KOG_PFS_BN keys a K / V tile, KOG_PFS_STAGES tiles in flight.
static_assert(KOG_PFS_BN == 128, "kog_pf_attention_ws: 128-key tiles (S is m64n128)");
static_assert(KOG_PFS_CWG == 2 || KOG_PFS_CWG == 3, "kog_pf_attention_ws: 2 or 3 computing warpgroups");
#define KOG_PFS_BM (64 * KOG_PFS_CWG)                   // queries a block
#define KOG_PFS_THREADS (128 * (KOG_PFS_CWG + 1))
// registers a thread after the split (the block's 64K: the copier's 40 / 56, the rest shared by
// the computing warpgroups; the launch gives every thread 65536 / THREADS first)
#define KOG_PFS_REG_COPY (KOG_PFS_CWG == 2 ? 40 : 56)
#define KOG_PFS_REG_MATH (KOG_PFS_CWG == 2 ? 232 : 152)
// (setmaxnreg.inc waits until the registers are free: a split that does not add up would hang)
#define KOG_PFS_REG_LAUNCH (65536 / KOG_PFS_THREADS / 8 * 8)
static_assert(KOG_PFS_REG_COPY <= KOG_PFS_REG_LAUNCH && KOG_PFS_REG_LAUNCH <= KOG_PFS_REG_MATH &&
              128 * KOG_PFS_REG_COPY + 128 * KOG_PFS_CWG * KOG_PFS_REG_MATH <= 65536,
              "kog_pf_attention_ws: the register split must fit the block's 64K");
// named barriers: FULL(st, w) (the copier arrives, computing warpgroup w waits: 256 threads),
// EMPTY(st) (every computing warpgroup arrives, the copier waits: the whole block)
#define KOG_PFS_FULL(st, w) (1 + KOG_PFS_CWG * (st) + (w))
#define KOG_PFS_EMPTY(st) (1 + KOG_PFS_CWG * KOG_PFS_STAGES + (st))
static_assert(KOG_PFS_EMPTY(KOG_PFS_STAGES - 1) <= 15, "named barriers 1..15");

// The same causal flash attention as kog_pf_attention on Hopper's warpgroup products, with the
// copies taken off the computing warps. Warpgroup 0 copies Q and the K / V tiles into STAGES
// shared-memory stages (cp.async; handed over through named barriers) on a few registers a
// thread; each of the CWG computing warpgroups owns 64 query rows, with the registers the
// copier gave up: S = Q K^T reads Q and the K tile from shared memory, the online softmax runs
// on S's accumulators, and O += P V takes P from registers (the accumulators re-packed as A
// fragments, as in kog_pf_attention) and V from shared memory. A computing warpgroup waits
// only for its own FULL barrier, so the warpgroups drift apart and one's softmax runs beside
// another's products. One block an SM.
extern "C" __global__ void __launch_bounds__(KOG_PFS_THREADS, 1)
kog_pf_attention_ws(const kog_u16* __restrict__ q,       // (n, H, hd)
                    const kog_u16* __restrict__ kc,      // (KV, C, hd) this layer
                    const kog_u16* __restrict__ vc,      // (KV, C, hd)
                    kog_u16* __restrict__ out,           // (n, H * hd)
                    int n, const int* __restrict__ chunk_pos0, int context_length,
                    float scale_log2) {
    const int pos0 = *chunk_pos0;                                  // (device memory)
    constexpr int HD = KOG_HEAD_DIM, BM = KOG_PFS_BM, BN = KOG_PFS_BN, CH = HD / 8;
    constexpr int ST = KOG_PFS_STAGES;
    constexpr unsigned QPANEL = BM * 128u, KPANEL = BN * 128u;     // bytes of one 64-dim panel
    constexpr unsigned TILE = (HD / 64) * KPANEL;                  // bytes of one K or V tile
    extern __shared__ __align__(16) kog_u16 kog_pfs_sm[];
    const unsigned sq = (kog_smem_addr(kog_pfs_sm) + 1023u) & ~1023u;
    const unsigned skv = sq + (HD / 64) * QPANEL;                  // [stage][K, V] tiles
    const int qt = gridDim.x - 1 - blockIdx.x;                     // heaviest tiles first
    const int h = blockIdx.y, g = h / KOG_PF_GQA;
    const int wg = threadIdx.x / 128;
    const int last_pos = pos0 + min(n, (qt + 1) * BM) - 1;         // block's last query
    const int n_tiles = last_pos / BN + 1;
    auto swz = [](int row, int c, unsigned panel) -> unsigned {
        return (unsigned)(c / 8) * panel + (unsigned)row * 128u + (unsigned)(((c % 8) ^ (row % 8)) * 16);
    };

    if (blockDim.x != KOG_PFS_THREADS) __trap();                   // barrier counts assume it
    if (wg == 0) {
        // ---- the copier: Q with tile 0, then tile kt once its stage's tile kt - ST is done ----
        kog_setmaxnreg_dec<KOG_PFS_REG_COPY>();
        const int t = threadIdx.x;
        const kog_u16* kg = kc + (kog_u64)g * context_length * HD;
        const kog_u16* vg = vc + (kog_u64)g * context_length * HD;
        for (int kt = 0; kt < n_tiles; ++kt) {
            const int st = kt % ST, key0 = kt * BN;
            if (kt >= ST) kog_bar_sync(KOG_PFS_EMPTY(st), KOG_PFS_THREADS);
            if (kt == 0) {                    // rows past n: zeros, never written back
                for (int i = t; i < BM * CH; i += 128) {
                    const int row = i / CH, c = i - row * CH;
                    const bool ok = qt * BM + row < n;
                    const kog_u64 off = ((kog_u64)(ok ? qt * BM + row : 0) * KOG_N_HEADS + h) * HD + c * 8;
                    kog_copy16_zfill(sq + swz(row, c, QPANEL), q + off, ok);
                }
            }
            for (int i = t; i < BN * CH; i += 128) {          // rows past last_pos: zeros
                const int row = i / CH, c = i - row * CH;
                const bool ok = key0 + row <= last_pos;
                const kog_u64 off = (kog_u64)(ok ? key0 + row : 0) * HD + c * 8;
                const unsigned dst = skv + (unsigned)st * 2u * TILE + swz(row, c, KPANEL);
                kog_copy16_zfill(dst, kg + off, ok);
                kog_copy16_zfill(dst + TILE, vg + off, ok);
            }
            kog_cp_async_commit();
            kog_cp_async_wait<0>();
            kog_fence_async_shared();                              // (read by wgmma next)
#pragma unroll
            for (int w = 0; w < KOG_PFS_CWG; ++w) kog_bar_arrive(KOG_PFS_FULL(st, w), 256);
        }
        return;
    }
    // ---- the computing warpgroups ----
    kog_setmaxnreg_inc<KOG_PFS_REG_MATH>();
    const int cw = wg - 1, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int r = lane / 4, cq = lane % 4;
    const int row0 = qt * BM + cw * 64;                            // the warpgroup's first row
    const int wg_first = pos0 + row0;
    const int qpos_a = wg_first + warp * 16 + r, qpos_b = qpos_a + 8;
    const unsigned sq_wg = sq + (unsigned)cw * 64u * 128u;
    float o[HD / 8][4];                                            // (wgmma: HD / 2 floats)
#pragma unroll
    for (int i = 0; i < HD / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float (&o_acc)[HD / 2] = reinterpret_cast<float (&)[HD / 2]>(o);
    float m_a = KOG_NEG_INF, m_b = KOG_NEG_INF, l_a = 0.f, l_b = 0.f;   // rows r, r + 8
    for (int kt = 0; kt < n_tiles; ++kt) {
        const int st = kt % ST, key0 = kt * BN;
        const unsigned ks = skv + (unsigned)st * 2u * TILE, vs = ks + TILE;
        kog_bar_sync(KOG_PFS_FULL(st, cw), 256);
        float s[BN / 8][4];                                        // (wgmma: BN / 2 floats)
        float (&s_acc)[BN / 2] = reinterpret_cast<float (&)[BN / 2]>(s);
        kog_u32 pa[BN / 16][4];
        // ---- S = Q K^T (64 x BN; on every tile, the mask gives P = 0 past the last query) ----
        kog_wg_fence();
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
            const unsigned koff = (unsigned)(kk % 4) * 32u;       // k16 step in a panel
            kog_wgmma_ss_n128(s_acc, kog_wg_desc(sq_wg + (unsigned)(kk / 4) * QPANEL + koff, 16u, 1024u),
                              kog_wg_desc(ks + (unsigned)(kk / 4) * KPANEL + koff, 16u, 1024u), kk);
        }
        kog_wg_commit();
        kog_wg_wait_all();
        kog_wg_hold(s_acc);
        // ---- causal mask, online softmax, P as A fragments ----
        float al_a, al_b;
        kog_pf_softmax_rows(s, key0 + BN - 1 > wg_first, key0, cq, qpos_a, qpos_b, scale_log2,
                            m_a, m_b, l_a, l_b, al_a, al_b);
        kog_pf_rescale(o, al_a, al_b);
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) kog_pf_pack_p(s, kk, pa[kk]);
        // ---- O += P V ----
        kog_wg_hold(o_acc);
        kog_wg_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
#if KOG_HEAD_DIM == 64
            kog_wgmma_rs_n64(o_acc, pa[kk], kog_wg_desc(vs + (unsigned)kk * 2048u, KPANEL, 1024u));
#else
            kog_wgmma_rs_n128(o_acc, pa[kk], kog_wg_desc(vs + (unsigned)kk * 2048u, KPANEL, 1024u));
#endif
        }
        kog_wg_commit();
        kog_wg_wait_all();
        kog_wg_hold(o_acc);
        // the stage is free for tile kt + ST (the copier waits for every computing warpgroup)
        if (kt + ST < n_tiles) kog_bar_arrive(KOG_PFS_EMPTY(st), KOG_PFS_THREADS);
    }
    kog_pf_store_rows(out, o, l_a, l_b, row0 + warp * 16 + r, n, h);
}
#endif  // KOG_WGMMA

// One warp per (query, q head); grid (n, H), block KOG_WARP threads.
extern "C" __global__ void kog_pf_attention_simple(const kog_u16* __restrict__ q,
                                                   const kog_u16* __restrict__ kc,
                                                   const kog_u16* __restrict__ vc,
                                                   kog_u16* __restrict__ out,
                                                   int n, const int* __restrict__ chunk_pos0,
                                                   int context_length, float scale_log2) {
    const int pos0 = *chunk_pos0;
    constexpr int HD = KOG_HEAD_DIM, PER = (HD + KOG_WARP - 1) / KOG_WARP;
    const int i = blockIdx.x, h = blockIdx.y, g = h / KOG_PF_GQA, lane = threadIdx.x;
    const int qpos = pos0 + i;
    const kog_u16* qr = q + ((kog_u64)i * KOG_N_HEADS + h) * HD;
    const kog_u64 kv_base = (kog_u64)g * context_length * HD;
    float qv[PER], acc[PER];
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int d = lane + k * KOG_WARP;
        qv[k] = d < HD ? kog_w_to_f32(qr[d]) * scale_log2 : 0.f;
        acc[k] = 0.f;
    }
    float m = KOG_NEG_INF, l = 0.f;
    for (int j = 0; j <= qpos; ++j) {
        const kog_u16* kr = kc + kv_base + (kog_u64)j * HD;
        float sc = 0.f;
#pragma unroll
        for (int k = 0; k < PER; ++k) {
            const int d = lane + k * KOG_WARP;
            if (d < HD) sc = fmaf(qv[k], kog_w_to_f32(kr[d]), sc);
        }
        sc = kog_warp_sum(sc);
        const float mn = fmaxf(m, sc);
        const float a = exp2f(m - mn), e = exp2f(sc - mn);
        l = l * a + e;
        const kog_u16* vr = vc + kv_base + (kog_u64)j * HD;
#pragma unroll
        for (int k = 0; k < PER; ++k) {
            const int d = lane + k * KOG_WARP;
            if (d < HD) acc[k] = fmaf(acc[k], a, e * kog_w_to_f32(vr[d]));
        }
        m = mn;
    }
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int d = lane + k * KOG_WARP;
        if (d < HD) out[(kog_u64)i * KOG_PF_Q_DIM + h * HD + d] = kog_f32_to_w(acc[k] / l);
    }
}
