// ============================================================================================
// burst_probe.cu -- how fast a one-shot burst of weight loads drains, and when a block's read
// of a residual sum issued behind it comes back (scripts/burst_probe.py; kernels_src/PERF.md,
// "A block's read of a sum waits for the tiles it issued before it"). Each group of 32 threads
// (a warp on NVIDIA; 16 groups a block) issues TILES tiles of 8 16-byte streaming loads a lane
// (4 KB a tile: two of the GEMVs' tiles at KOG_GEMV_MAX_LOADS 4; kog_ld_stream) at once, then
// consumes them; or streams `stream_tiles` tiles with two in flight, as kog_gemv does.
// Thread 0 stamps the block's start, the sum's read back (every thread's) and the end
// (kog_globaltimer: ns on NVIDIA, 10-ns ticks on AMD).
//   mode bit 0: the even blocks red.add 4 words a thread into `sum` (2,048 words, one part
//               from each of half the grid, as down's pairs add into an in sum)
//   mode bit 1: every block reads the 2,048 words of `sum` once after issuing its loads (one
//               read, not the kernel's poll until every part is in)
//   mode bit 2: the even blocks issue no loads (is the wait their own or the memory's?)
// ============================================================================================
#include "platform.cuh"
#ifndef TILES
#error "TILES (tiles a warp issues at once) comes from scripts/burst_probe.py"
#endif

KOG_DEVICE kog_u32 kog_probe_fold(const kog_vec4& v) {
    return KOG_V4(v, 0) ^ KOG_V4(v, 1) ^ KOG_V4(v, 2) ^ KOG_V4(v, 3);
}

extern "C" __global__ void __launch_bounds__(512)
kog_burst_probe(const kog_vec4* W, kog_u64* sum, kog_u64* stamps, kog_u32* sink, int mode,
                int stream_tiles) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int gw = blockIdx.x * 16 + warp;
    const bool even = blockIdx.x % 2 == 0;
    __shared__ kog_u64 t_read;
    if (threadIdx.x == 0) { stamps[blockIdx.x * 3] = kog_globaltimer(); t_read = 0; }
    __syncthreads();
    if ((mode & 1) && even)
        for (int k = 0; k < 4; ++k) kog_red_add_u64(sum + threadIdx.x + 512 * k, 1ull);
    kog_u32 acc = 0;
    if (stream_tiles == 0) {
        const kog_vec4* base = W + (kog_u64)gw * (TILES * 256);
        const bool idle = (mode & 4) && even;
        kog_vec4 r[TILES * 8];
#pragma unroll
        for (int j = 0; j < TILES * 8; ++j)
            if (!idle) r[j] = kog_ld_stream(base + j * 32 + lane);
            else for (int k = 0; k < 4; ++k) KOG_V4_SET(r[j], k, 0u);
        if (mode & 2) {
            kog_u64 s = 0;
            for (int k = 0; k < 4; ++k) s += kog_ld_tagged(sum + threadIdx.x + 512 * k);
            // the barrier's predicate uses every thread's words: the block passes it only once
            // all of its reads are back
            if (__syncthreads_or((kog_u32)s == 0x12345678u && (kog_u32)(s >> 32) == 0x9abcdefu))
                sink[1] = 1u;
            if (threadIdx.x == 0) t_read = kog_globaltimer();
        }
#pragma unroll
        for (int j = 0; j < TILES * 8; ++j) acc += kog_probe_fold(r[j]);
    } else {
        const kog_vec4* base = W + (kog_u64)gw * (stream_tiles * 256);   // (stream_tiles even)
        kog_vec4 a[8], b[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) a[j] = kog_ld_stream(base + j * 32 + lane);
#pragma unroll
        for (int j = 0; j < 8; ++j) b[j] = kog_ld_stream(base + 256 + j * 32 + lane);
        for (int i = 0; i < stream_tiles; i += 2) {
#pragma unroll
            for (int j = 0; j < 8; ++j) acc += kog_probe_fold(a[j]);
            if (i + 2 < stream_tiles) {
#pragma unroll
                for (int j = 0; j < 8; ++j) a[j] = kog_ld_stream(base + (i + 2) * 256 + j * 32 + lane);
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) acc += kog_probe_fold(b[j]);
            if (i + 3 < stream_tiles) {
#pragma unroll
                for (int j = 0; j < 8; ++j) b[j] = kog_ld_stream(base + (i + 3) * 256 + j * 32 + lane);
            }
        }
    }
    if (acc == 0x12345678u) sink[0] = acc;           // keeps the loads
    __syncthreads();
    if (threadIdx.x == 0) {
        stamps[blockIdx.x * 3 + 1] = t_read;
        stamps[blockIdx.x * 3 + 2] = kog_globaltimer();
    }
}
