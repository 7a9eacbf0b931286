// ============================================================================================
// kccl.cuh -- in-kernel collectives across GPUs of one host (KCCL).
//
// Every rank runs its own persistent kernel; collectives happen INSIDE it, by plain stores
// straight into the peers' buffers (peer access enabled, unified addressing: a device pointer
// of GPU j is valid in a kernel on GPU i) and readiness flags. No NCCL, no NVSHMEM, never
// NVLink multicast. kogcupy/gpu/kccl.py allocates the buffers and builds the pointer table.
//
// Buffers of rank j (one allocation, zeroed once, never reset):
//   flags[KCCL_MAX_BLOCKS][n_ranks]            u32 epochs: flags[b][src] = last epoch that
//                                              block b of rank src published to rank j
//   recv [2 parity][n_ranks src][slot_bytes]    payload slots: what rank src sent rank j
//
// Protocol of one collective at epoch e (every rank calls the collectives in the same order
// and numbers them 1, 2, 3, ...; the caller owns the epoch counter):
//   1. block b stores its slice of the local vector into slot [e & 1][me] of EVERY rank
//      (itself included), 16-byte stores over NVLink/xGMI;
//   2. __syncthreads, then thread p < n_ranks does one system-scope release store
//      flags_p[b][me] = e (the release orders the whole block's stores, seen through the
//      barrier, before the flag: the same pattern as kog_signal_counter, at system scope
//      because the reader is another GPU);
//   3. thread p < n_ranks spins with system-scope acquire loads until the local
//      flags[b][p] >= e, then __syncthreads;
//   4. the block reads slice b of every source slot with L2-coherent loads (ld.cg: L1 may
//      still hold the line from epoch e - 2) and sums in rank order 0..n-1 in fp32, so every
//      rank gets bit-identical results (tensor-parallel ranks must agree on every value).
//
// Monotone epochs: flags only grow (step e waits for flag >= e, compared modulo 2^32), so
// nothing is reset between steps or launches; the host carries the epoch across launches.
//
// Why two payload parities suffice (WAR): rank r writes slot parity e & 1 of rank q again at
// epoch e + 2. To get there, block b of rank r finished epoch e + 1, whose step 3 waited for
// flags[b][q] >= e + 1 -- published by block b of rank q in step 2 of epoch e + 1, which
// comes after (program order, then the release) its step 4 of epoch e: its reads of slice b
// at parity e & 1. So slice b of parity e & 1 is rewritten only after every rank's block b
// has read it. The argument is per block, so it needs the SAME blocks and the SAME slicing
// in every collective that shares a comm (blocks with an empty slice still publish and
// wait): do not mix the one-block simple versions and the sliced fast ones on one comm
// without a grid-wide dependency in between.
//
// A wait that lasts longer than KCCL_TIMEOUT_NS (a peer never launched, a crashed rank)
// makes the collective return false in every thread of the block instead of hanging.
// ============================================================================================
#pragma once
#include "platform.cuh"

#ifndef KCCL_MAX_RANKS
#define KCCL_MAX_RANKS 8
#endif
#ifndef KCCL_MAX_BLOCKS
#define KCCL_MAX_BLOCKS 256
#endif
#ifndef KCCL_TIMEOUT_NS
#define KCCL_TIMEOUT_NS 4000000000ull
#endif

// Peer pointer table (kogcupy/gpu/kccl.py: PEER_TABLE_WORDS u64 per rank, on the rank's GPU):
//   [0, KCCL_MAX_RANKS)                  recv base of rank p, as a pointer valid on this GPU
//   [KCCL_MAX_RANKS, 2 * KCCL_MAX_RANKS) flags base of rank p
struct KcclComm {
    int rank, n_ranks;
    kog_u64 slot_bytes;                 // one (parity, source) payload slot, multiple of 16
    char* recv[KCCL_MAX_RANKS];         // rank p's payload slots [2][n_ranks][slot_bytes]
    kog_u32* flags[KCCL_MAX_RANKS];     // rank p's flags [KCCL_MAX_BLOCKS][n_ranks]
};

KOG_DEVICE void kccl_comm_init(KcclComm& c, const kog_u64* table, int rank, int n_ranks,
                               kog_u64 slot_bytes) {
    c.rank = rank;
    c.n_ranks = n_ranks;
    c.slot_bytes = slot_bytes;
    for (int p = 0; p < KCCL_MAX_RANKS; ++p) {
        c.recv[p] = reinterpret_cast<char*>(table[p]);
        c.flags[p] = reinterpret_cast<kog_u32*>(table[KCCL_MAX_RANKS + p]);
    }
}

// Slot [parity][src] of rank `dst`, as 16-byte chunks.
KOG_DEVICE kog_vec4* kccl_slot(const KcclComm& c, int dst, int parity, int src) {
    return reinterpret_cast<kog_vec4*>(c.recv[dst] +
                                       ((kog_u64)parity * c.n_ranks + src) * c.slot_bytes);
}

// Spin until *flag >= epoch (modulo 2^32), acquire at system scope. False on timeout.
KOG_DEVICE bool kccl_wait_flag(const kog_u32* flag, kog_u32 epoch) {
    if ((int)(kog_ld_acquire_system(flag) - epoch) >= 0) return true;
    const kog_u64 t0 = kog_globaltimer();
    for (unsigned spins = 0;; ++spins) {
        if ((int)(kog_ld_acquire_system(flag) - epoch) >= 0) return true;
        if ((spins & 1023u) == 1023u && kog_globaltimer() - t0 > KCCL_TIMEOUT_NS) return false;
    }
}

// --------------------------------------------------------------------------------------------
// Payload types: one 16-byte chunk holds 4 fp32 or 8 bf16 values; sums are always fp32.
// --------------------------------------------------------------------------------------------
struct KcclF32 {
    static constexpr int PER_CHUNK = 4;
    KOG_DEVICE static void add(float* acc, const kog_vec4& v) {
#pragma unroll
        for (int k = 0; k < 4; ++k) acc[k] += __uint_as_float(KOG_V4(v, k));
    }
};
struct KcclBf16 {
    static constexpr int PER_CHUNK = 8;
    KOG_DEVICE static void add(float* acc, const kog_vec4& v) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            acc[2 * k] += kog_bf16_lo(KOG_V4(v, k));
            acc[2 * k + 1] += kog_bf16_hi(KOG_V4(v, k));
        }
    }
};

// Sum chunk i of every source slot (parity `par`, this rank's buffer) in rank order.
template <class T>
KOG_DEVICE void kccl_sum_chunk(const KcclComm& c, int par, int i, float* out) {
    float acc[T::PER_CHUNK];
#pragma unroll
    for (int k = 0; k < T::PER_CHUNK; ++k) acc[k] = 0.f;
    for (int p = 0; p < c.n_ranks; ++p)
        T::add(acc, kog_ld_cg_v4(kccl_slot(c, c.rank, par, p) + i));
    float4* o = reinterpret_cast<float4*>(out + (kog_u64)i * T::PER_CHUNK);
#pragma unroll
    for (int k = 0; k < T::PER_CHUNK / 4; ++k)
        o[k] = make_float4(acc[4 * k], acc[4 * k + 1], acc[4 * k + 2], acc[4 * k + 3]);
}

// ============================================================================================
// SIMPLE versions -- the oracle and the documentation. One block, whole vectors, thread 0
// raises one flag per destination and waits for every source in turn.
//   src(i): the i-th 16-byte chunk of this rank's vector (n_chunks of them).
// Uses flag row 0 only: never mix with the fast versions on one comm (see the header).
// ============================================================================================
template <class T, class Src>
KOG_DEVICE bool kccl_all_reduce_simple(const KcclComm& c, kog_u32 epoch, int n_chunks, Src src,
                                       float* out) {
    const int par = epoch & 1;
    for (int i = threadIdx.x; i < n_chunks; i += blockDim.x) {      // 1. copy to everyone
        const kog_vec4 v = src(i);
        for (int p = 0; p < c.n_ranks; ++p) kccl_slot(c, p, par, c.rank)[i] = v;
    }
    __syncthreads();
    bool late = false;
    if (threadIdx.x == 0) {
        for (int p = 0; p < c.n_ranks; ++p)                            // 2. publish
            kog_st_release_system(c.flags[p] + c.rank, epoch);
        for (int p = 0; p < c.n_ranks; ++p)                            // 3. wait
            late |= !kccl_wait_flag(c.flags[c.rank] + p, epoch);
    }
    if (__syncthreads_or(late)) return false;
    for (int i = threadIdx.x; i < n_chunks; i += blockDim.x)          // 4. sum in rank order
        kccl_sum_chunk<T>(c, par, i, out);
    return true;
}

// out_chunks[p * n_chunks + i] = chunk i of rank p's vector (raw bits, same dtype).
template <class Src>
KOG_DEVICE bool kccl_all_gather_simple(const KcclComm& c, kog_u32 epoch, int n_chunks, Src src,
                                       kog_vec4* out_chunks) {
    const int par = epoch & 1;
    for (int i = threadIdx.x; i < n_chunks; i += blockDim.x) {
        const kog_vec4 v = src(i);
        for (int p = 0; p < c.n_ranks; ++p) kccl_slot(c, p, par, c.rank)[i] = v;
    }
    __syncthreads();
    bool late = false;
    if (threadIdx.x == 0) {
        for (int p = 0; p < c.n_ranks; ++p) kog_st_release_system(c.flags[p] + c.rank, epoch);
        for (int p = 0; p < c.n_ranks; ++p) late |= !kccl_wait_flag(c.flags[c.rank] + p, epoch);
    }
    if (__syncthreads_or(late)) return false;
    for (int p = 0; p < c.n_ranks; ++p)
        for (int i = threadIdx.x; i < n_chunks; i += blockDim.x)
            out_chunks[(kog_u64)p * n_chunks + i] = kog_ld_cg_v4(kccl_slot(c, c.rank, par, p) + i);
    return true;
}

// ============================================================================================
// FAST versions: `n_blocks` blocks of this rank cooperate, block `block` owning chunks
// [block * n_chunks / n_blocks, (block + 1) * n_chunks / n_blocks) and its own flag row, so
// large vectors spread over SMs and the per-destination flags go out in parallel (thread p
// publishes to rank p and waits for rank p). Every block of the set must call every
// collective on the comm, also with an empty slice. Results are bit-identical to the simple
// versions (same rank order of the fp32 sums).
// ============================================================================================
KOG_DEVICE bool kccl_exchange_flags(const KcclComm& c, kog_u32 epoch, int block) {
    __syncthreads();                                   // the block's payload stores are done
    bool late = false;
    const int p = threadIdx.x;
    if (p < c.n_ranks) {
        kog_st_release_system(c.flags[p] + block * c.n_ranks + c.rank, epoch);
        late = !kccl_wait_flag(c.flags[c.rank] + block * c.n_ranks + p, epoch);
    }
    return !__syncthreads_or(late);
}

KOG_DEVICE void kccl_slice(int n_chunks, int block, int n_blocks, int& c0, int& c1) {
    c0 = (int)((long long)n_chunks * block / n_blocks);
    c1 = (int)((long long)n_chunks * (block + 1) / n_blocks);
}

template <class T, class Src>
KOG_DEVICE bool kccl_all_reduce(const KcclComm& c, kog_u32 epoch, int n_chunks, Src src,
                                float* out, int block, int n_blocks) {
    const int par = epoch & 1;
    int c0, c1;
    kccl_slice(n_chunks, block, n_blocks, c0, c1);
    for (int i = c0 + threadIdx.x; i < c1; i += blockDim.x) {
        const kog_vec4 v = src(i);
        for (int p = 0; p < c.n_ranks; ++p) kccl_slot(c, p, par, c.rank)[i] = v;
    }
    if (!kccl_exchange_flags(c, epoch, block)) return false;
    for (int i = c0 + threadIdx.x; i < c1; i += blockDim.x) kccl_sum_chunk<T>(c, par, i, out);
    return true;
}

template <class Src>
KOG_DEVICE bool kccl_all_gather(const KcclComm& c, kog_u32 epoch, int n_chunks, Src src,
                                kog_vec4* out_chunks, int block, int n_blocks) {
    const int par = epoch & 1;
    int c0, c1;
    kccl_slice(n_chunks, block, n_blocks, c0, c1);
    for (int i = c0 + threadIdx.x; i < c1; i += blockDim.x) {
        const kog_vec4 v = src(i);
        for (int p = 0; p < c.n_ranks; ++p) kccl_slot(c, p, par, c.rank)[i] = v;
    }
    if (!kccl_exchange_flags(c, epoch, block)) return false;
    const int len = c1 - c0;
    for (int j = threadIdx.x; j < len * c.n_ranks; j += blockDim.x) {
        const int p = j / len, i = c0 + j % len;
        out_chunks[(kog_u64)p * n_chunks + i] = kog_ld_cg_v4(kccl_slot(c, c.rank, par, p) + i);
    }
    return true;
}

// ============================================================================================
// LL (low-latency) all-reduce: the readiness travels WITH the data, as in the monokernel's
// tagged activations (and NCCL's LL protocol). Every 4 payload bytes go out as one 8-byte
// word `payload | epoch << 32`, stored single-copy-atomic at system scope, so a reader spins
// on exactly the words it reads until each carries this epoch: no flag, no system fence, no
// second NVLink round trip -- at twice the bytes on the wire (the slot holds 2x the payload).
// Same slots, parity and slicing as kccl_all_reduce; epochs must match exactly (a slot holds
// epochs e - 2, e, e + 2, ...). WAR: block b of rank q writes epoch e + 1 only after a block
// barrier that follows its reads of epoch e, and rank r writes e + 2 only after reading q's
// e + 1 words of slice b, so parity e & 1 is rewritten after every reader is done with it.
// ============================================================================================
KOG_DEVICE kog_u64 kccl_ll_word(kog_u32 payload, kog_u32 epoch) {
    return ((kog_u64)epoch << 32) | (kog_u64)payload;
}

template <class T, class Src>
KOG_DEVICE bool kccl_all_reduce_ll(const KcclComm& c, kog_u32 epoch, int n_chunks, Src src,
                                   float* out, int block, int n_blocks) {
    const int par = epoch & 1;
    int c0, c1;
    kccl_slice(n_chunks, block, n_blocks, c0, c1);
    for (int i = c0 + threadIdx.x; i < c1; i += blockDim.x) {
        const kog_vec4 v = src(i);
        const kog_u64 w0 = kccl_ll_word(KOG_V4(v, 0), epoch), w1 = kccl_ll_word(KOG_V4(v, 1), epoch);
        const kog_u64 w2 = kccl_ll_word(KOG_V4(v, 2), epoch), w3 = kccl_ll_word(KOG_V4(v, 3), epoch);
        for (int p = 0; p < c.n_ranks; ++p) {
            kog_u64* d = reinterpret_cast<kog_u64*>(kccl_slot(c, p, par, c.rank)) + 4 * (kog_u64)i;
            kog_st_tagged2_system(d, w0, w1);
            kog_st_tagged2_system(d + 2, w2, w3);
        }
    }
    bool late = false;
    for (int i = c0 + threadIdx.x; i < c1 && !late; i += blockDim.x) {
        float acc[T::PER_CHUNK];
#pragma unroll
        for (int k = 0; k < T::PER_CHUNK; ++k) acc[k] = 0.f;
        for (int p = 0; p < c.n_ranks && !late; ++p) {
            const kog_u64* s = reinterpret_cast<const kog_u64*>(kccl_slot(c, c.rank, par, p)) +
                               4 * (kog_u64)i;
            kog_u64 w[4];
            kog_u64 t0 = 0;
            for (unsigned spins = 0;; ++spins) {
                kog_ld_tagged2_system(s, w[0], w[1]);
                kog_ld_tagged2_system(s + 2, w[2], w[3]);
                if (kog_tag_of(w[0]) == epoch && kog_tag_of(w[1]) == epoch &&
                    kog_tag_of(w[2]) == epoch && kog_tag_of(w[3]) == epoch) break;
                if ((spins & 1023u) == 0u) {
                    if (spins == 0u) t0 = kog_globaltimer();
                    else if (kog_globaltimer() - t0 > KCCL_TIMEOUT_NS) { late = true; break; }
                }
            }
#if defined(KOG_HIP)
            const kog_vec4 v = {(kog_u32)w[0], (kog_u32)w[1], (kog_u32)w[2], (kog_u32)w[3]};
#else
            const kog_vec4 v = make_uint4((kog_u32)w[0], (kog_u32)w[1], (kog_u32)w[2], (kog_u32)w[3]);
#endif
            T::add(acc, v);
        }
        float4* o = reinterpret_cast<float4*>(out + (kog_u64)i * T::PER_CHUNK);
#pragma unroll
        for (int k = 0; k < T::PER_CHUNK / 4; ++k)
            o[k] = make_float4(acc[4 * k], acc[4 * k + 1], acc[4 * k + 2], acc[4 * k + 3]);
    }
    return !__syncthreads_or(late);      // also the barrier between these reads and the next writes
}

// ============================================================================================
// Element-wise tagged collectives of the tensor-parallel monokernel (KOG_TP > 1). Its vectors
// carry their readiness in every 8-byte word (value | tag << 32, sync.cuh); across GPUs the
// same words simply go to EVERY rank's copy of a buffer, stored single-copy atomic at system
// scope -- the LL protocol above with the monokernel's version tag as the epoch:
//   all-reduce of element i: rank q stores its partial into part[q * stride + i] on every
//     rank; whoever needs the sum on a rank waits until part[0..n)[i] carry the tag and adds
//     them in rank order 0..n-1 (bit-identical on every rank);
//   all-gather: the same store into every rank's copy, read in place by the consumer.
// `bases` is one row of a peer table: bases[q] is rank q's buffer, as a pointer valid here.
// No flag, no fence: a reader knows from each word whether it is the version it waits for.
// Write-after-read: the caller guarantees (by its own data dependencies) that a word is not
// overwritten with a newer tag before every reader has read it (monokernel: SYNC.md).
// ============================================================================================
KOG_DEVICE void kccl_put_tagged(const kog_u64* bases, int n_ranks, kog_u64 index, float v,
                                kog_u32 tag) {
    for (int q = 0; q < n_ranks; ++q)
        kog_st_tagged_system(reinterpret_cast<kog_u64*>(bases[q]) + index, v, tag);
}

// Spin until *p (written by any rank) carries `tag`; its value. Sets `late` instead of
// hanging when the wait exceeds KCCL_TIMEOUT_NS (a peer never ran).
KOG_DEVICE float kccl_wait_tagged(const kog_u64* p, kog_u32 tag, bool& late) {
    kog_u64 w = kog_ld_tagged_system(p);
    if (kog_tag_of(w) == tag) return kog_value_of(w);
    const kog_u64 t0 = kog_globaltimer();
    for (unsigned spins = 1;; ++spins) {
        w = kog_ld_tagged_system(p);
        if (kog_tag_of(w) == tag) return kog_value_of(w);
        if ((spins & 1023u) == 0u && kog_globaltimer() - t0 > KCCL_TIMEOUT_NS) {
            late = true;
            return 0.f;
        }
    }
}

// sum over q in rank order of part[q * stride] (this rank's buffer, written by every rank).
KOG_DEVICE float kccl_sum_tagged(const kog_u64* part, kog_u64 stride, int n_ranks, kog_u32 tag,
                                 bool& late) {
    float s = 0.f;
    for (int q = 0; q < n_ranks && !late; ++q) s += kccl_wait_tagged(part + q * stride, tag, late);
    return s;
}
