// ============================================================================================
// kccl_test.cu -- test and benchmark kernels of kccl.cuh (tests/test_multigpu_kccl.py,
// scripts/bench_kccl.py). One launch per rank runs `steps` collectives back to back, inside
// one persistent kernel, on fresh data: element i of rank r at epoch e is
// kccl_test_value(r, e, i), a hash the host mirrors (kogcupy/gpu/kccl.py: step_values), so every
// step is different and checkable. Results of step s go to out row s % out_steps.
// ============================================================================================
#include "kccl.cuh"

// 24-bit integer / 2^23 in [-1, 1): exact in fp32, sums of up to 8 are exact too.
KOG_DEVICE float kccl_test_value(kog_u32 rank, kog_u32 epoch, kog_u32 i) {
    kog_u32 h = (i * 0x9E3779B1u) ^ (epoch * 0x85EBCA77u + rank * 0xC2B2AE3Du + 0x27D4EB2Fu);
    h ^= h >> 15;
    h *= 0x2C1B3C6Du;
    h ^= h >> 12;
    h *= 0x297A2D39u;
    h ^= h >> 15;
    return (float)((int)(h >> 8) - 0x800000) * (1.0f / 8388608.0f);
}

// The i-th 16-byte chunk of rank r's vector at epoch e (bf16: the fp32 value truncated).
template <class T>
struct KcclTestSrc {
    kog_u32 rank, epoch;
    KOG_DEVICE kog_vec4 operator()(int i) const {
        kog_u32 w[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            if (T::PER_CHUNK == 4) {
                w[k] = __float_as_uint(kccl_test_value(rank, epoch, 4 * i + k));
            } else {
                const kog_u32 lo = __float_as_uint(kccl_test_value(rank, epoch, 8 * i + 2 * k));
                const kog_u32 hi = __float_as_uint(kccl_test_value(rank, epoch, 8 * i + 2 * k + 1));
                w[k] = (lo >> 16) | (hi & 0xffff0000u);
            }
        }
        kog_vec4 v;
#if defined(KOG_HIP)
        v[0] = w[0]; v[1] = w[1]; v[2] = w[2]; v[3] = w[3];
#else
        v = make_uint4(w[0], w[1], w[2], w[3]);
#endif
        return v;
    }
};

// Op 5: element i of the vector goes to slot (e & 1, me) of every rank as one tagged word;
// block b then sums its slice of elements over the ranks, in rank order.
template <class T, class Src>
KOG_DEVICE bool kccl_test_tagged_reduce(const KcclComm& c, kog_u32 epoch, int n_elems, Src src,
                                        float* out, int block, int n_blocks) {
    const int par = epoch & 1;
    int e0, e1;
    kccl_slice(n_elems / T::PER_CHUNK, block, n_blocks, e0, e1);
    e0 *= T::PER_CHUNK;
    e1 *= T::PER_CHUNK;
    kog_u64 bases[KCCL_MAX_RANKS];
    for (int p = 0; p < c.n_ranks; ++p)
        bases[p] = reinterpret_cast<kog_u64>(kccl_slot(c, p, par, 0));
    const kog_u64 stride = c.slot_bytes / 8;            // words per (parity, source) slot
    for (int i = e0 + threadIdx.x; i < e1; i += blockDim.x) {
        const kog_vec4 v = src(i / T::PER_CHUNK);
        float vals[T::PER_CHUNK];
#pragma unroll
        for (int k = 0; k < T::PER_CHUNK; ++k) vals[k] = 0.f;
        T::add(vals, v);
        kccl_put_tagged(bases, c.n_ranks, c.rank * stride + i, vals[i % T::PER_CHUNK], epoch);
    }
    bool late = false;
    const kog_u64* mine = reinterpret_cast<const kog_u64*>(kccl_slot(c, c.rank, par, 0));
    for (int i = e0 + threadIdx.x; i < e1 && !late; i += blockDim.x)
        out[i] = kccl_sum_tagged(mine + i, stride, c.n_ranks, epoch, late);
    return !__syncthreads_or(late);
}

// op: 0 all-reduce simple, 1 all-reduce fast, 2 all-gather simple, 3 all-gather fast,
// 4 all-reduce LL (slot_bytes >= 2x the payload), 5 element-wise tagged all-reduce (the
// tensor-parallel monokernel's: kccl_put_tagged + kccl_sum_tagged; slot_bytes >= 2x payload).
// The simple ops run in block 0 alone (launch them with one block).
// out: all-reduce [out_steps][n_elems] fp32; all-gather [out_steps][n_ranks][n_elems] of T.
// times[0], times[1]: %globaltimer (ns) of block 0 after step warm_steps - 1 and after the
// last step. status[0] != 0: a wait timed out (value: 1 + the step).
template <class T>
KOG_DEVICE void kccl_test_body(const kog_u64* table, int rank, int n_ranks, kog_u64 slot_bytes,
                               int n_elems, int steps, kog_u32 epoch0, int op, void* out,
                               int out_steps, int warm_steps, kog_u64* times, kog_u32* status) {
    __shared__ KcclComm comm;
    if (threadIdx.x == 0) kccl_comm_init(comm, table, rank, n_ranks, slot_bytes);
    __syncthreads();
    const int n_chunks = n_elems / T::PER_CHUNK;
    for (int s = 0; s < steps; ++s) {
        const kog_u32 epoch = epoch0 + (kog_u32)s + 1u;
        const KcclTestSrc<T> src{(kog_u32)rank, epoch};
        const kog_u64 row = (kog_u64)(s % out_steps);
        bool ok;
        if (op == 0) {
            ok = kccl_all_reduce_simple<T>(comm, epoch, n_chunks, src,
                                           (float*)out + row * n_elems);
        } else if (op == 1) {
            ok = kccl_all_reduce<T>(comm, epoch, n_chunks, src, (float*)out + row * n_elems,
                                    blockIdx.x, gridDim.x);
        } else if (op == 4) {
            ok = kccl_all_reduce_ll<T>(comm, epoch, n_chunks, src, (float*)out + row * n_elems,
                                       blockIdx.x, gridDim.x);
        } else if (op == 5) {
            ok = kccl_test_tagged_reduce<T>(comm, epoch, n_elems, src, (float*)out + row * n_elems,
                                            blockIdx.x, gridDim.x);
        } else if (op == 2) {
            ok = kccl_all_gather_simple(comm, epoch, n_chunks, src,
                                        (kog_vec4*)out + row * n_ranks * n_chunks);
        } else {
            ok = kccl_all_gather(comm, epoch, n_chunks, src,
                                 (kog_vec4*)out + row * n_ranks * n_chunks, blockIdx.x,
                                 gridDim.x);
        }
        if (!ok) {
            if (threadIdx.x == 0) atomicMax(status, (kog_u32)s + 1u);
            return;
        }
        if (blockIdx.x == 0 && threadIdx.x == 0) {
            if (s == warm_steps - 1) times[0] = kog_globaltimer();
            if (s == steps - 1) times[1] = kog_globaltimer();
        }
    }
}

extern "C" __global__ void kccl_test_f32(const kog_u64* table, int rank, int n_ranks,
                                         kog_u64 slot_bytes, int n_elems, int steps,
                                         kog_u32 epoch0, int op, void* out, int out_steps,
                                         int warm_steps, kog_u64* times, kog_u32* status) {
    kccl_test_body<KcclF32>(table, rank, n_ranks, slot_bytes, n_elems, steps, epoch0, op, out,
                            out_steps, warm_steps, times, status);
}

extern "C" __global__ void kccl_test_bf16(const kog_u64* table, int rank, int n_ranks,
                                          kog_u64 slot_bytes, int n_elems, int steps,
                                          kog_u32 epoch0, int op, void* out, int out_steps,
                                          int warm_steps, kog_u64* times, kog_u32* status) {
    kccl_test_body<KcclBf16>(table, rank, n_ranks, slot_bytes, n_elems, steps, epoch0, op, out,
                             out_steps, warm_steps, times, status);
}
