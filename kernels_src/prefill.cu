// ============================================================================================
// prefill.cu -- the prompt in chunks of many tokens, before the monokernel starts.
//
// The matrix products (qkv, o_proj, gate_up, down) are cuBLAS/hipBLAS GEMMs on tensor cores
// launched by kogcupy/gpu/prefill.py; this file holds what sits between them, one kernel per job:
//   kog_pf_embed        x[i] = embed[ids[i]]                                  (fp32 rows)
//   kog_pf_rmsnorm      xn[i] = x[i] / rms(x[i]) in the storage dtype (the gamma is folded
//                       into the next matrix, as in the monokernel)
//   kog_pf_qkv_rope     bias, qwen3 q/k RMSNorm, RoPE; q to a (n, H, hd) buffer, K/V appended
//                       straight into the monokernel's cache layout (L, KV, C, hd)
//   kog_pf_attention    causal attention of the chunk's queries over cached + new positions
//                       (prefill_attention.cuh: tensor-core flash tiles, or a portable path)
//   kog_pf_silu_mul     act[i] = silu(gate) * up from the interleaved gate/up GEMM output
//   kog_pf_add_parts    tensor parallel: x += the ranks' o_proj / down partials, in rank order
// Shapes: n tokens in the chunk, pos0 the position of its first token (read from device memory:
// prefill.py replays one captured graph for chunks of a size at any position), h hidden, f ffn,
// H / KV heads, hd head_dim, C KV-cache positions. Model constants come as -D defines
// (kogcupy/gpu/prefill.py: prefill_defines).
// ============================================================================================
#include "platform.cuh"

#define KOG_PF_QKV_DIM ((KOG_N_HEADS + 2 * KOG_N_KV) * KOG_HEAD_DIM)
#define KOG_PF_Q_DIM (KOG_N_HEADS * KOG_HEAD_DIM)
#define KOG_PF_GQA (KOG_N_HEADS / KOG_N_KV)
static_assert(KOG_N_HEADS % KOG_N_KV == 0, "whole GQA groups");
static_assert(KOG_HEAD_DIM % 2 == 0, "RoPE pairs");

// ---- embed: one block per token -------------------------------------------------------------
extern "C" __global__ void kog_pf_embed(const kog_u16* __restrict__ embed,   // (V, h)
                                        const int* __restrict__ ids,         // (n,)
                                        float* __restrict__ x) {             // (n, h)
    const kog_u16* row = embed + (kog_u64)ids[blockIdx.x] * KOG_HIDDEN;
    float* out = x + (kog_u64)blockIdx.x * KOG_HIDDEN;
    for (int i = threadIdx.x; i < KOG_HIDDEN; i += blockDim.x) out[i] = kog_w_to_f32(row[i]);
}

// ---- rmsnorm: one block per token; out in the storage dtype (GEMM input) --------------------
extern "C" __global__ void kog_pf_rmsnorm(const float* __restrict__ x,       // (n, h)
                                          kog_u16* __restrict__ out) {       // (n, h)
    __shared__ float red[32];
    const float* row = x + (kog_u64)blockIdx.x * KOG_HIDDEN;
    float ss = 0.f;
    for (int i = threadIdx.x; i < KOG_HIDDEN; i += blockDim.x) ss = fmaf(row[i], row[i], ss);
    ss = kog_warp_sum(ss);
    const int warp = threadIdx.x / KOG_WARP, n_warps = blockDim.x / KOG_WARP;
    if (threadIdx.x % KOG_WARP == 0) red[warp] = ss;
    __syncthreads();
    float tot = 0.f;
    for (int w = 0; w < n_warps; ++w) tot += red[w];
    const float inv = rsqrtf(tot / (float)KOG_HIDDEN + KOG_EPS);
    kog_u16* o = out + (kog_u64)blockIdx.x * KOG_HIDDEN;
    for (int i = threadIdx.x; i < KOG_HIDDEN; i += blockDim.x) o[i] = kog_f32_to_w(row[i] * inv);
}

// ---- qkv post-processing: one block per token, one warp per head ----------------------------
extern "C" __global__ void kog_pf_qkv_rope(
        const float* __restrict__ qkv,        // (n, qkv_dim) raw GEMM output [q; k; v]
        const float* __restrict__ bqkv,       // (qkv_dim,) this layer's biases, or null
        const float* __restrict__ q_norm,     // (hd,) this layer's q RMSNorm gamma, or null
        const float* __restrict__ k_norm,     // (hd,)
        const float* __restrict__ rope_cos,   // (R, hd/2)
        const float* __restrict__ rope_sin,   // (R, hd/2)
        kog_u16* __restrict__ q_out,          // (n, H, hd) storage dtype
        kog_u16* __restrict__ k_cache,        // (KV, C, hd) this layer's slice
        kog_u16* __restrict__ v_cache,        // (KV, C, hd)
        const int* __restrict__ chunk_pos0,   // position of token 0 (device memory)
        int context_length) {
    constexpr int HD = KOG_HEAD_DIM, HALF = HD / 2, HEADS = KOG_N_HEADS + 2 * KOG_N_KV;
    const int i = blockIdx.x, pos = *chunk_pos0 + i;
    const int lane = threadIdx.x % KOG_WARP, warp = threadIdx.x / KOG_WARP;
    const int n_warps = blockDim.x / KOG_WARP;
    const float* row = qkv + (kog_u64)i * KOG_PF_QKV_DIM;
    const float* cs = rope_cos + (kog_u64)pos * HALF;
    const float* sn = rope_sin + (kog_u64)pos * HALF;
    for (int hh = warp; hh < HEADS; hh += n_warps) {
        const bool is_q = hh < KOG_N_HEADS, is_v = hh >= KOG_N_HEADS + KOG_N_KV;
        const float* v = row + hh * HD;
        const float* b = bqkv != nullptr ? bqkv + hh * HD : nullptr;
        float scale = 1.f;
        const float* gamma = is_v ? nullptr : (is_q ? q_norm : k_norm);
        if (gamma != nullptr) {
            float ss = 0.f;
            for (int d = lane; d < HD; d += KOG_WARP) {
                const float a = v[d] + (b != nullptr ? b[d] : 0.f);
                ss = fmaf(a, a, ss);
            }
            scale = rsqrtf(kog_warp_sum(ss) / (float)HD + KOG_EPS);
        }
        kog_u16* dst;
        if (is_q) dst = q_out + ((kog_u64)i * KOG_N_HEADS + hh) * HD;
        else {
            const int g = is_v ? hh - KOG_N_HEADS - KOG_N_KV : hh - KOG_N_HEADS;
            dst = (is_v ? v_cache : k_cache) + ((kog_u64)g * context_length + pos) * HD;
        }
        for (int d = lane; d < HALF; d += KOG_WARP) {
            float x1 = v[d] + (b != nullptr ? b[d] : 0.f);
            float x2 = v[d + HALF] + (b != nullptr ? b[d + HALF] : 0.f);
            if (gamma != nullptr) { x1 = x1 * scale * gamma[d]; x2 = x2 * scale * gamma[d + HALF]; }
            if (!is_v) {
                const float co = cs[d], si = sn[d];
                const float y1 = x1 * co - x2 * si, y2 = x2 * co + x1 * si;
                x1 = y1; x2 = y2;
            }
            dst[d] = kog_f32_to_w(x1);
            dst[d + HALF] = kog_f32_to_w(x2);
        }
    }
}

// ---- silu(gate) * up: gate/up rows are interleaved (gate_j, up_j) as in the packed layout ----
extern "C" __global__ void kog_pf_silu_mul(const float* __restrict__ gu,     // (n, f, 2)
                                           kog_u16* __restrict__ act,        // (n, f)
                                           unsigned long long total) {       // n * f
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long j = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
         j < total; j += stride) {
        const float2 p = reinterpret_cast<const float2*>(gu)[j];
        act[j] = kog_f32_to_w(p.x / (1.f + expf(-p.x)) * p.y);
    }
}

// ---- tensor parallel: x += the ranks' partials of o_proj or down, in rank order -------------
extern "C" __global__ void kog_pf_add_parts(float* __restrict__ x,             // (n, h)
                                            const float* __restrict__ parts,   // (R, rows, h)
                                            int n_parts, unsigned long long count,     // n * h
                                            unsigned long long slot) {         // rows * h
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long j = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
         j < count; j += stride) {
        float s = parts[j];
        for (int r = 1; r < n_parts; ++r) s += parts[(unsigned long long)r * slot + j];
        x[j] += s;                            // the same bits on every rank
    }
}

#include "prefill_attention.cuh"
