// ============================================================================================
// platform.cuh -- the one CUDA/HIP portability header of the monokernel.
//
// Everything that differs between NVIDIA (NVRTC/nvcc) and AMD (hiprtc/hipcc) lives here:
// warp size, shuffles, fences, acquire/release flag accesses, non-temporal 16-byte weight
// loads, L2-coherent activation loads, and the bf16/fp16 pair dot products (fp32 accumulate).
// No standard headers: NVRTC has none, and the kernels need none.
// ============================================================================================
#pragma once

#if defined(__HIPCC__) || defined(__HIP_PLATFORM_AMD__)
#define KOG_HIP 1
#if !defined(__HIPCC_RTC__)
#include <hip/hip_runtime.h>
#endif
#else
#define KOG_CUDA 1
#endif

#define KOG_DEVICE __device__ __forceinline__
#define KOG_DEVICE_NOINLINE __device__ __noinline__   // a call: the caller keeps its registers

typedef unsigned int kog_u32;
typedef unsigned long long kog_u64;
typedef unsigned short kog_u16;

// --------------------------------------------------------------------------------------------
// Warp (wavefront) size: 32 on NVIDIA, 64 on CDNA, 32 on RDNA (wave32). Never hard-coded.
// --------------------------------------------------------------------------------------------
#if defined(KOG_HIP)
#if defined(__AMDGCN_WAVEFRONT_SIZE)
#define KOG_WARP __AMDGCN_WAVEFRONT_SIZE
#else
#define KOG_WARP 64
#endif
#else
#define KOG_WARP 32
#endif

// --------------------------------------------------------------------------------------------
// 16-byte vector type for weight streaming.
// --------------------------------------------------------------------------------------------
#if defined(KOG_HIP)
typedef kog_u32 kog_vec4 __attribute__((ext_vector_type(4)));
#define KOG_V4(v, i) ((v)[i])
#define KOG_V4_SET(v, i, x) ((v)[i] = (x))
#else
typedef uint4 kog_vec4;
KOG_DEVICE kog_u32 kog_v4_get(const kog_vec4& v, int i) {
    return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}
#define KOG_V4(v, i) kog_v4_get((v), (i))
KOG_DEVICE void kog_v4_set(kog_vec4& v, int i, kog_u32 x) {
    if (i == 0) v.x = x; else if (i == 1) v.y = x; else if (i == 2) v.z = x; else v.w = x;
}
#define KOG_V4_SET(v, i, x) kog_v4_set((v), (i), (x))
#endif

// --------------------------------------------------------------------------------------------
// Shuffles
// --------------------------------------------------------------------------------------------
KOG_DEVICE float kog_shfl_xor(float v, int m) {
#if defined(KOG_HIP)
    return __shfl_xor(v, m);
#else
    return __shfl_xor_sync(0xffffffffu, v, m);
#endif
}
KOG_DEVICE int kog_shfl_int(int v, int src_lane) {
#if defined(KOG_HIP)
    return __shfl(v, src_lane);
#else
    return __shfl_sync(0xffffffffu, v, src_lane);
#endif
}
KOG_DEVICE int kog_shfl_xor_int(int v, int m) {
#if defined(KOG_HIP)
    return __shfl_xor(v, m);
#else
    return __shfl_xor_sync(0xffffffffu, v, m);
#endif
}

KOG_DEVICE void kog_syncwarp() {
#if defined(KOG_HIP)
    __builtin_amdgcn_wave_barrier();
#else
    __syncwarp();
#endif
}

template <class T>
KOG_DEVICE T kog_shfl_up(T v, int d) {
#if defined(KOG_HIP)
    return __shfl_up(v, d);
#else
    return __shfl_up_sync(0xffffffffu, v, d);
#endif
}

KOG_DEVICE float kog_warp_sum(float v) {
#pragma unroll
    for (int m = KOG_WARP / 2; m > 0; m >>= 1) v += kog_shfl_xor(v, m);
    return v;
}
// 2^x, hardware approximation (~2 ulp; denormal results flush to 0, fine for softmax weights)
KOG_DEVICE float kog_exp2(float x) {
#if defined(KOG_HIP)
    return exp2f(x);
#else
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#endif
}
KOG_DEVICE float kog_warp_max(float v) {
#pragma unroll
    for (int m = KOG_WARP / 2; m > 0; m >>= 1) v = fmaxf(v, kog_shfl_xor(v, m));
    return v;
}

// --------------------------------------------------------------------------------------------
// Loads
// --------------------------------------------------------------------------------------------
// Weights never change during a launch: read-only path, no L1 allocation, L2 prefetch hint.
KOG_DEVICE kog_vec4 kog_ld_stream(const kog_vec4* p) {
#if defined(KOG_HIP)
    return __builtin_nontemporal_load(p);
#else
    kog_vec4 r;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
#endif
}

// Asynchronous 16-byte copy global -> shared (L2 only, no registers), Ampere+ cp.async.
#if !defined(KOG_HIP)
// The 32-bit shared-memory address of a pointer into shared memory (the form PTX takes).
KOG_DEVICE unsigned kog_smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
KOG_DEVICE void kog_cp_async16(void* smem_dst, const void* gmem_src) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;"
                 :: "r"(kog_smem_addr(smem_dst)), "l"(gmem_src) : "memory");
}
KOG_DEVICE void kog_cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
KOG_DEVICE void kog_cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }
#endif

// 16-byte global -> shared copy that may complete later (kog_copy16_wait_groups): cp.async on
// CUDA, a plain copy on HIP. The source must be coherent at L2 (written before an acquire).
KOG_DEVICE void kog_copy16(void* smem_dst, const void* gmem_src) {
#if defined(KOG_HIP)
    *reinterpret_cast<kog_vec4*>(smem_dst) = *reinterpret_cast<const kog_vec4*>(gmem_src);
#else
    kog_cp_async16(smem_dst, gmem_src);
#endif
}
// Groups of kog_copy16s (a staged tile each): close the group issued since the last commit;
// wait until at most N groups are still in flight (this thread's copies). No-ops on HIP.
KOG_DEVICE void kog_copy16_commit() {
#if !defined(KOG_HIP)
    kog_cp_async_commit();
#endif
}
template <int N>
KOG_DEVICE void kog_copy16_wait_groups() {
#if !defined(KOG_HIP)
    kog_cp_async_wait<N>();
#endif
}

// Tensor-core tile math (NVIDIA sm_80+; the decode attention's chunk loop and the prefill
// attention): a warp's mma.sync m16n8k16 in the storage dtype with fp32 accumulators, 8x8
// tiles of 16-bit values loaded from shared memory (ldmatrix: lane l gives the row address of
// tile l / 8, row l % 8; .trans delivers each tile transposed) or transposed in registers
// (movmatrix). Shared-memory operands are 32-bit shared addresses (kog_smem_addr).
#if !defined(KOG_HIP)
// A 16-byte copy global -> shared that zero-fills its destination when `valid` is false (no
// bytes are read then).
KOG_DEVICE void kog_copy16_zfill(unsigned dst, const void* gmem_src, bool valid) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;"
                 :: "r"(dst), "l"(gmem_src), "r"(valid ? 16 : 0) : "memory");
}
KOG_DEVICE void kog_ldsm_x4(kog_u32 (&r)[4], unsigned row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(row) : "memory");
}
KOG_DEVICE void kog_ldsm_x4_trans(kog_u32 (&r)[4], unsigned row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(row) : "memory");
}
KOG_DEVICE kog_u32 kog_movmatrix_trans(kog_u32 x) {
    kog_u32 r;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
    return r;
}
// d += a b: a 16x16 (row-major fragment, 4 registers), b 16x8 (2 registers), d 16x8 fp32.
KOG_DEVICE void kog_mma_w(float (&d)[4], const kog_u32 (&a)[4], kog_u32 b0, kog_u32 b1) {
#if defined(KOG_WEIGHT_FP16)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
#endif
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// Warpgroup tensor-core products (Hopper wgmma; builds with KOG_WGMMA, compiled for sm_90a:
// the prefill attention). A warpgroup (4 warps, 128 threads) computes D (64 x N, fp32) += A (64
// x 16) B (16 x N); A and B come from shared memory through 64-bit descriptors
// (kog_wg_desc), or A from registers (the mma.sync m16n8k16 A fragment of each warp's 16 rows).
// D's layout per warp is that of N / 8 mma.sync m16n8 accumulators: d[4j + e] is row
// 16 * warp + lane / 4 (+ 8 for e >= 2), column 8j + 2 (lane % 4) + (e & 1).
// Shared-memory operands use the 128-byte swizzle: rows of 128 bytes, the 16-byte piece c of
// row r stored at piece c ^ (r % 8), each 8-row group (1024 bytes) 1024-byte aligned.
// kog_wgmma_ss: A and B K-major (rows along M / N, the 16 k values of a step contiguous);
// kog_wgmma_rs: A in registers, B N-major (rows along K: V as it is stored).
#if defined(KOG_WGMMA)
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "KOG_WGMMA needs the sm_90a target (kernels.py adds -arch=sm_90a for it)"
#endif
#if defined(KOG_WEIGHT_FP16)
#define KOG_WG_AB "f16"
#else
#define KOG_WG_AB "bf16"
#endif
// descriptor of a 128-byte-swizzled operand at shared address `addr`: lbo = bytes between
// 64-element panels along M / N (N-major only), sbo = bytes between 8-row groups
KOG_DEVICE kog_u64 kog_wg_desc(unsigned addr, unsigned lbo, unsigned sbo) {
    return (kog_u64)((addr & 0x3FFFFu) >> 4) | ((kog_u64)((lbo & 0x3FFFFu) >> 4) << 16) |
           ((kog_u64)((sbo & 0x3FFFFu) >> 4) << 32) | (1ull << 62);
}
KOG_DEVICE void kog_wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
KOG_DEVICE void kog_wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
KOG_DEVICE void kog_wg_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// shared memory written by this thread (cp.async, stores) made visible to wgmma's reads
KOG_DEVICE void kog_fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// pins accumulator registers at this point (no use moves above a wait, no write below a product)
template <int N>
KOG_DEVICE void kog_wg_hold(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i]) :: "memory");
}
KOG_DEVICE void kog_wgmma_rs_n64(float (&d)[32], const kog_u32 (&a)[4], kog_u64 db) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." KOG_WG_AB "." KOG_WG_AB " "
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
KOG_DEVICE void kog_wgmma_rs_n128(float (&d)[64], const kog_u32 (&a)[4], kog_u64 db) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." KOG_WG_AB "." KOG_WG_AB " "
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
KOG_DEVICE void kog_wgmma_ss_n128(float (&d)[64], kog_u64 da, kog_u64 db, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." KOG_WG_AB "." KOG_WG_AB " "
                 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "l"(da), "l"(db), "r"(accumulate));
}
// warp-specialised blocks: named barriers (id 1..15; `count` threads, a multiple of 32; the
// non-.aligned forms: the block's warps reach different barrier instructions) and the
// per-thread register budget moved between warpgroups (every thread of a warpgroup runs it)
KOG_DEVICE void kog_bar_sync(int id, int count) {
    asm volatile("barrier.sync %0, %1;" :: "r"(id), "r"(count) : "memory");
}
KOG_DEVICE void kog_bar_arrive(int id, int count) {
    asm volatile("barrier.arrive %0, %1;" :: "r"(id), "r"(count) : "memory");
}
template <int R>
KOG_DEVICE void kog_setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" :: "n"(R)); }
template <int R>
KOG_DEVICE void kog_setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" :: "n"(R)); }
#endif  // KOG_WGMMA

// Thread-block clusters (NVIDIA sm_90; the kernel's __cluster_dims__, monokernel.cu): the
// block's rank in its cluster, a barrier of all the cluster's threads (release / acquire:
// shared-memory writes before it are seen by the other blocks after it), and a load from
// another block's shared memory at the address of `p` in this block's.
#if !defined(KOG_HIP)       // (called only where KOG_CLUSTER > 1: sm_90+)
KOG_DEVICE unsigned kog_cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
KOG_DEVICE void kog_cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
KOG_DEVICE float kog_ld_cluster(const float* p, unsigned rank) {
    unsigned r;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(kog_smem_addr(p)), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(r) : "memory");
    return v;
}
#endif

// Data written by other blocks during this launch (activations, KV cache, partials): bypass
// L1, which is not coherent across multiprocessors; L2 is the point of coherence.
KOG_DEVICE float kog_ld_cg(const float* p) {
#if defined(KOG_HIP)
    return __hip_atomic_load(p, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_AGENT);
#else
    return __ldcg(p);
#endif
}
KOG_DEVICE float4 kog_ld_cg4(const float4* p) {
#if defined(KOG_HIP)
    const float* f = reinterpret_cast<const float*>(p);
    return make_float4(kog_ld_cg(f), kog_ld_cg(f + 1), kog_ld_cg(f + 2), kog_ld_cg(f + 3));
#else
    return __ldcg(p);
#endif
}
KOG_DEVICE kog_vec4 kog_ld_cg_v4(const kog_vec4* p) {
#if defined(KOG_HIP)
    const kog_u32* u = reinterpret_cast<const kog_u32*>(p);
    kog_vec4 r;
    for (int i = 0; i < 4; ++i) r[i] = __hip_atomic_load(u + i, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_AGENT);
    return r;
#else
    return __ldcg(p);
#endif
}
KOG_DEVICE int kog_ld_cg_int(const int* p) {
#if defined(KOG_HIP)
    return __hip_atomic_load(p, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_AGENT);
#else
    return __ldcg(p);
#endif
}
KOG_DEVICE kog_u32 kog_ld_cg_u32(const kog_u32* p) {
#if defined(KOG_HIP)
    return __hip_atomic_load(p, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_AGENT);
#else
    return __ldcg(p);
#endif
}
KOG_DEVICE kog_u16 kog_ld_cg_u16(const kog_u16* p) {
#if defined(KOG_HIP)
    return *(const volatile kog_u16*)p;
#else
    return __ldcg(p);
#endif
}

// --------------------------------------------------------------------------------------------
// Tagged activations: an 8-byte word (fp32 value bits | tag << 32), written and read with
// single-copy-atomic relaxed accesses, so a reader knows from the word itself whether the
// value it holds is the version it waits for (sync.cuh).
// --------------------------------------------------------------------------------------------
KOG_DEVICE void kog_st_tagged(kog_u64* p, float v, kog_u32 tag) {
    const kog_u64 w = ((kog_u64)tag << 32) | (kog_u64)__float_as_uint(v);
#if defined(KOG_HIP)
    __hip_atomic_store(p, w, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_AGENT);
#else
    asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" :: "l"(p), "l"(w) : "memory");
#endif
}
KOG_DEVICE kog_u64 kog_ld_tagged(const kog_u64* p) {
#if defined(KOG_HIP)
    return __hip_atomic_load(p, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_AGENT);
#else
    kog_u64 w;
    asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(w) : "l"(p) : "memory");
    return w;
#endif
}
// Two consecutive tagged words (p 16-byte aligned); each word is read atomically.
KOG_DEVICE void kog_ld_tagged2(const kog_u64* p, kog_u64& a, kog_u64& b) {
#if defined(KOG_HIP)
    a = __hip_atomic_load(p, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_AGENT);
    b = __hip_atomic_load(p + 1, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_AGENT);
#else
    asm volatile("ld.relaxed.gpu.global.v2.u64 {%0,%1}, [%2];" : "=l"(a), "=l"(b) : "l"(p) : "memory");
#endif
}
KOG_DEVICE kog_u32 kog_tag_of(kog_u64 w) { return (kog_u32)(w >> 32); }
KOG_DEVICE float kog_value_of(kog_u64 w) { return __uint_as_float((kog_u32)w); }
// Fire-and-forget 64-bit integer add in L2 (the residual sums, sync.cuh: kog_sum_word).
KOG_DEVICE void kog_red_add_u64(kog_u64* p, kog_u64 v) {
#if defined(KOG_HIP)
    __hip_atomic_fetch_add(p, v, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_AGENT);
#else
    asm volatile("red.relaxed.gpu.global.add.u64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
#endif
}
KOG_DEVICE void kog_fence_gpu() {
#if defined(KOG_HIP)
    __threadfence();
#else
    asm volatile("fence.acq_rel.gpu;" ::: "memory");
#endif
}

// --------------------------------------------------------------------------------------------
// Acquire / release flag accesses (device scope) and system-scope host communication
// --------------------------------------------------------------------------------------------
KOG_DEVICE kog_u32 kog_ld_acquire(const kog_u32* p) {
#if defined(KOG_HIP)
    return __hip_atomic_load(p, __ATOMIC_ACQUIRE, __HIP_MEMORY_SCOPE_AGENT);
#else
    kog_u32 v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
#endif
}
KOG_DEVICE void kog_red_release(kog_u32* p, kog_u32 v) {
#if defined(KOG_HIP)
    __hip_atomic_fetch_add(p, v, __ATOMIC_RELEASE, __HIP_MEMORY_SCOPE_AGENT);
#else
    asm volatile("red.release.gpu.global.add.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
#endif
}
KOG_DEVICE kog_u32 kog_atomic_add_acq_rel(kog_u32* p, kog_u32 v) {
#if defined(KOG_HIP)
    return __hip_atomic_fetch_add(p, v, __ATOMIC_ACQ_REL, __HIP_MEMORY_SCOPE_AGENT);
#else
    kog_u32 old;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;"
                 : "=r"(old) : "l"(p), "r"(v) : "memory");
    return old;
#endif
}
KOG_DEVICE void kog_st_relaxed(kog_u32* p, kog_u32 v) {
#if defined(KOG_HIP)
    __hip_atomic_store(p, v, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_AGENT);
#else
    asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
#endif
}
KOG_DEVICE void kog_st_relaxed_u64(kog_u64* p, kog_u64 v) {
#if defined(KOG_HIP)
    __hip_atomic_store(p, v, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_AGENT);
#else
    asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
#endif
}
// Host-mapped memory: the host reads what the kernel publishes and writes the cancel flag.
KOG_DEVICE void kog_fence_system() {
#if defined(KOG_HIP)
    __threadfence_system();
#else
    asm volatile("fence.sc.sys;" ::: "memory");
#endif
}
KOG_DEVICE void kog_st_release_system(kog_u32* p, kog_u32 v) {
#if defined(KOG_HIP)
    __hip_atomic_store(p, v, __ATOMIC_RELEASE, __HIP_MEMORY_SCOPE_SYSTEM);
#else
    asm volatile("st.release.sys.global.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
#endif
}
KOG_DEVICE kog_u32 kog_ld_acquire_system(const kog_u32* p) {
#if defined(KOG_HIP)
    return __hip_atomic_load(p, __ATOMIC_ACQUIRE, __HIP_MEMORY_SCOPE_SYSTEM);
#else
    kog_u32 v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
#endif
}
KOG_DEVICE kog_u64 kog_globaltimer() {
#if defined(KOG_HIP)
#if defined(__HIP_DEVICE_COMPILE__)
    return __builtin_amdgcn_s_memrealtime();       // 100 MHz on CDNA
#else
    return 0;
#endif
#else
    kog_u64 t;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
    return t;
#endif
}

// Spin-wait body: a consumer polls one L2 line; latency matters more than the polling traffic.
KOG_DEVICE kog_u32 kog_ld_relaxed_system(const kog_u32* p) {
#if defined(KOG_HIP)
    return __hip_atomic_load(p, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
#else
    kog_u32 v;
    asm volatile("ld.relaxed.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
#endif
}

// Two tagged words (p 16-byte aligned) written to / read from ANOTHER GPU's memory (KCCL's
// LL protocol, kccl.cuh): system scope, each 8-byte word single-copy atomic.
KOG_DEVICE void kog_st_tagged2_system(kog_u64* p, kog_u64 a, kog_u64 b) {
#if defined(KOG_HIP)
    __hip_atomic_store(p, a, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
    __hip_atomic_store(p + 1, b, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
#else
    asm volatile("st.relaxed.sys.global.v2.u64 [%0], {%1,%2};" :: "l"(p), "l"(a), "l"(b) : "memory");
#endif
}
KOG_DEVICE void kog_ld_tagged2_system(const kog_u64* p, kog_u64& a, kog_u64& b) {
#if defined(KOG_HIP)
    a = __hip_atomic_load(p, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
    b = __hip_atomic_load(p + 1, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
#else
    asm volatile("ld.relaxed.sys.global.v2.u64 {%0,%1}, [%2];" : "=l"(a), "=l"(b) : "l"(p) : "memory");
#endif
}

// Ends the whole launch with an error (the host sees a failed kernel instead of a hang).
KOG_DEVICE void kog_trap() {
#if defined(KOG_HIP)
    abort();
#else
    __trap();
#endif
}
// One tagged word (fp32 value | tag << 32) stored into / read from memory another GPU also
// writes or reads (tensor-parallel partial sums, kccl.cuh): system scope, single-copy atomic.
KOG_DEVICE void kog_st_tagged_system(kog_u64* p, float v, kog_u32 tag) {
    const kog_u64 w = ((kog_u64)tag << 32) | (kog_u64)__float_as_uint(v);
#if defined(KOG_HIP)
    __hip_atomic_store(p, w, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
#else
    asm volatile("st.relaxed.sys.global.u64 [%0], %1;" :: "l"(p), "l"(w) : "memory");
#endif
}
KOG_DEVICE kog_u64 kog_ld_tagged_system(const kog_u64* p) {
#if defined(KOG_HIP)
    return __hip_atomic_load(p, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
#else
    kog_u64 w;
    asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(w) : "l"(p) : "memory");
    return w;
#endif
}
KOG_DEVICE void kog_st_relaxed_system(kog_u32* p, kog_u32 v) {
#if defined(KOG_HIP)
    __hip_atomic_store(p, v, __ATOMIC_RELAXED, __HIP_MEMORY_SCOPE_SYSTEM);
#else
    asm volatile("st.relaxed.sys.global.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
#endif
}
// Release add to a counter another GPU polls (after a block barrier, as kog_signal_counter).
KOG_DEVICE void kog_red_release_system(kog_u32* p, kog_u32 v) {
#if defined(KOG_HIP)
    __hip_atomic_fetch_add(p, v, __ATOMIC_RELEASE, __HIP_MEMORY_SCOPE_SYSTEM);
#else
    asm volatile("red.release.sys.global.add.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
#endif
}

KOG_DEVICE void kog_pause() {
#if defined(KOG_HIP)
    __builtin_amdgcn_s_sleep(1);
#endif
}

// --------------------------------------------------------------------------------------------
// Storage dtype of weights and KV cache: bf16 (default) or fp16 (-DKOG_WEIGHT_FP16), raw bits.
// --------------------------------------------------------------------------------------------
KOG_DEVICE float kog_bf16_lo(kog_u32 w) { return __uint_as_float(w << 16); }
KOG_DEVICE float kog_bf16_hi(kog_u32 w) { return __uint_as_float(w & 0xffff0000u); }

KOG_DEVICE float kog_f16_to_f32(kog_u16 h) {
#if defined(KOG_HIP)
    return (float)__builtin_bit_cast(_Float16, h);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}
KOG_DEVICE kog_u16 kog_f32_to_f16(float f) {
#if defined(KOG_HIP)
    return __builtin_bit_cast(kog_u16, (_Float16)f);
#else
    kog_u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}
KOG_DEVICE kog_u16 kog_f32_to_bf16(float f) {
    kog_u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (kog_u16)0x7fc0;      // NaN stays NaN
    return (kog_u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);          // round to nearest even
}

#if defined(KOG_WEIGHT_FP16)
KOG_DEVICE float kog_w_lo(kog_u32 w) { return kog_f16_to_f32((kog_u16)(w & 0xffffu)); }
KOG_DEVICE float kog_w_hi(kog_u32 w) { return kog_f16_to_f32((kog_u16)(w >> 16)); }
KOG_DEVICE float kog_w_to_f32(kog_u16 h) { return kog_f16_to_f32(h); }
KOG_DEVICE kog_u16 kog_f32_to_w(float f) { return kog_f32_to_f16(f); }
// Two values already in the storage dtype (exactly representable) as one packed pair.
KOG_DEVICE kog_u32 kog_pack_w(float lo, float hi) {
    return (kog_u32)kog_f32_to_f16(lo) | ((kog_u32)kog_f32_to_f16(hi) << 16);
}
#else
KOG_DEVICE float kog_w_lo(kog_u32 w) { return kog_bf16_lo(w); }
KOG_DEVICE float kog_w_hi(kog_u32 w) { return kog_bf16_hi(w); }
KOG_DEVICE float kog_w_to_f32(kog_u16 h) { return __uint_as_float(((kog_u32)h) << 16); }
KOG_DEVICE kog_u16 kog_f32_to_w(float f) { return kog_f32_to_bf16(f); }
KOG_DEVICE kog_u32 kog_pack_w(float lo, float hi) {
    return (__float_as_uint(lo) >> 16) | (__float_as_uint(hi) & 0xffff0000u);
}
#endif

// Two fp32 values rounded to nearest into the storage dtype as one packed pair (lo in the
// low half), and what is left of them: x - stored(x) rounded the same way. hi + lo carries
// ~16 mantissa bits, which is how fp32 values enter tensor-core products (attention.cuh).
KOG_DEVICE kog_u32 kog_pack_rn(float lo, float hi) {
#if defined(KOG_HIP)
    return (kog_u32)kog_f32_to_w(lo) | ((kog_u32)kog_f32_to_w(hi) << 16);
#else
    kog_u32 r;
#if defined(KOG_WEIGHT_FP16)
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
#endif
}
KOG_DEVICE void kog_split_rn(float lo, float hi, kog_u32& big, kog_u32& rest) {
    big = kog_pack_rn(lo, hi);
    rest = kog_pack_rn(lo - kog_w_lo(big), hi - kog_w_hi(big));
}

// Dot product of 8 weights (one 16-byte vector, 4 pairs) with 8 fp32 activations, fp32 accumulate.
KOG_DEVICE float kog_dot8(const kog_vec4& w, const float* x, float acc) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        kog_u32 p = KOG_V4(w, i);
        acc = fmaf(kog_w_lo(p), x[2 * i], acc);
        acc = fmaf(kog_w_hi(p), x[2 * i + 1], acc);
    }
    return acc;
}
// acc[0:8) += a * (8 weights of w): one 16-byte chunk of a row scaled by one activation.
KOG_DEVICE void kog_axpy8(const kog_vec4& w, float a, float* acc) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        kog_u32 p = KOG_V4(w, i);
        acc[2 * i] = fmaf(a, kog_w_lo(p), acc[2 * i]);
        acc[2 * i + 1] = fmaf(a, kog_w_hi(p), acc[2 * i + 1]);
    }
}

// The multiprocessor (CUDA %smid) / compute unit (HIP) this block runs on; fixed for its life.
KOG_DEVICE unsigned kog_sm_id() {
#if defined(KOG_HIP)
    return (unsigned)__smid();
#else
    unsigned id;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
    return id;
#endif
}

#if defined(KOG_HIP) && (defined(__gfx940__) || defined(__gfx941__) || defined(__gfx942__))
#define KOG_GFX94X 1             // MI300: several XCCs (accelerator dies) on one GPU
#endif
// gfx94x (MI300): the XCC (accelerator die) this wave runs on, hardware register XCC_ID
// (id 20, bits [3:0]); elsewhere 0.
KOG_DEVICE unsigned kog_xcc_id() {
#if defined(KOG_GFX94X)
    return (unsigned)__builtin_amdgcn_s_getreg(20 | (0 << 6) | (3 << 11)) & 0xfu;
#else
    return 0u;
#endif
}

#define KOG_INT_MAX 2147483647
#define KOG_NEG_INF (__int_as_float(0xff800000))
