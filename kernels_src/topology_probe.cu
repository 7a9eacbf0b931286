// ============================================================================================
// topology_probe.cu -- which multiprocessors are near which L2 partition (kogcupy/gpu/topology.py).
//
// One block per multiprocessor (the host asks for more than half of an SM's shared memory, so
// two blocks never share one); the blocks take turns (an arrival ticket), so each measures
// alone. Thread 0 of the k-th block to arrive records, in slot k, its SM id (CUDA %smid; HIP
// the CU id, and the XCC id on gfx94x)
// and, for each probe line, the mean latency in clock cycles of `reps` dependent L2 loads
// (ld.cg: L1 bypassed) of that line, after one warming load. The lines hold zeros that the
// compiler cannot know: each load's address depends on the previous load's value.
// ============================================================================================
#include "platform.cuh"

extern "C" __global__ void kog_topology_probe(const unsigned* __restrict__ lines, int n_lines,
                                              int stride_words, int reps, unsigned* turn,
                                              unsigned* __restrict__ ids, float* __restrict__ lat) {
    __shared__ volatile unsigned s_sink;
    if (threadIdx.x != 0) return;
    // Arrival ticket, then wait for it: blocks measure one at a time in the order they started,
    // whatever order the hardware dispatched them in (turn[0] tickets, turn[1] now serving).
    const unsigned me = atomicAdd(turn, 1u);
    while (kog_ld_acquire(turn + 1) != me) {}
    ids[2 * me] = kog_sm_id();
    ids[2 * me + 1] = kog_xcc_id();
    unsigned sink = 0u;
    for (int l = 0; l < n_lines; ++l) {
        const unsigned* p = lines + (kog_u64)l * stride_words;
        unsigned v = kog_ld_cg_u32(p);                   // in L2 now
        s_sink = v;                                      // (the store waits for the load)
        const long long t0 = clock64();
        for (int r = 0; r < reps; ++r) v = kog_ld_cg_u32(p + v);
        s_sink = v;                                      // the last load is inside the window
        const long long t1 = clock64();
        lat[(kog_u64)me * n_lines + l] = (float)(t1 - t0) / (float)reps;
        sink += v;
    }
    if (sink == 0x9e3779b9u) ids[0] = sink;              // keeps the chain (never true: zeros)
    kog_red_release(turn + 1, 1u);
}
