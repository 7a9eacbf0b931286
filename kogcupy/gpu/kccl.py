"""KCCL host side: peer GPUs, per-rank collective buffers, the peer pointer table.

One Python process drives N GPUs (DESIGN.md, "Multi-GPU (KCCL)"). ``Peers`` checks that the
GPUs exist and can reach each other, enables peer access (unified addressing: a device
pointer of GPU j is then valid in a kernel on GPU i) and keeps one stream per GPU.
``Comm`` allocates each rank's flags and payload slots (layout in kernels_src/kccl.cuh) and
the table of peer pointers each rank's kernel reads, and owns the epoch counter, which only
grows (flags are never reset, so consecutive launches go on numbering).

``run_test`` launches kernels_src/kccl_test.cu on every rank (R collectives back to back in
one launch); ``step_values`` is its data on the host (the kernel's hash, mirrored in NumPy).
"""
from __future__ import annotations

import numpy as np

from . import kernels
from ..errors import DeviceError

MAX_RANKS = 8            # KCCL_MAX_RANKS in kccl.cuh
MAX_BLOCKS = 256         # KCCL_MAX_BLOCKS
PEER_TABLE_WORDS = 2 * MAX_RANKS
FLAG_BYTES = MAX_BLOCKS * MAX_RANKS * 4
OPS = {"all_reduce_simple": 0, "all_reduce": 1, "all_gather_simple": 2, "all_gather": 3,
       "all_reduce_ll": 4, "all_reduce_tagged": 5}
DTYPES = {"float32": 4, "bfloat16": 2}
_PEER_ALREADY_ENABLED = (704,)   # cudaErrorPeerAccessAlreadyEnabled (hipErrorPeerAccessAlreadyEnabled)


def _cupy():
    return kernels._cupy()


def gpu_count() -> int:
    try:
        return int(_cupy().cuda.runtime.getDeviceCount())
    except Exception:  # noqa: BLE001 -- no driver / no CuPy: no GPUs
        return 0


class Peers:
    """n_gpus ranks on GPUs 0..n_gpus-1 (or on ``devices``: rank r on GPU devices[r]) with peer
    access enabled between every pair of distinct GPUs, one stream each. Ranks that share a GPU
    (a one-GPU run of the multi-rank protocol, for tests) reach each other's memory directly."""

    def __init__(self, n_gpus: int, devices: list[int] | None = None):
        cupy = _cupy()
        if n_gpus < 1 or n_gpus > MAX_RANKS:
            raise DeviceError(f"KCCL runs on 1 to {MAX_RANKS} GPUs, not {n_gpus}")
        devices = list(range(n_gpus)) if devices is None else [int(d) for d in devices]
        if len(devices) != n_gpus:
            raise DeviceError(f"{n_gpus} ranks need {n_gpus} device ids, got {devices}")
        have = gpu_count()
        if have <= max(devices):
            raise DeviceError(f"tensor parallel on GPUs {sorted(set(devices))} needs them visible, "
                              f"but CuPy sees {have}; check CUDA_VISIBLE_DEVICES / "
                              "HIP_VISIBLE_DEVICES")
        rt = cupy.cuda.runtime
        distinct = sorted(set(devices))
        for i in distinct:
            for j in distinct:
                if i != j and not rt.deviceCanAccessPeer(i, j):
                    raise DeviceError(f"GPU {i} cannot access GPU {j}'s memory (no peer access: "
                                      "not on one NVLink/xGMI/PCIe switch domain); "
                                      "KCCL needs every pair of GPUs peer-capable")
        for i in distinct:
            with cupy.cuda.Device(i):
                for j in distinct:
                    if i == j:
                        continue
                    try:
                        rt.deviceEnablePeerAccess(j)
                    except rt.CUDARuntimeError as e:
                        if getattr(e, "status", None) not in _PEER_ALREADY_ENABLED:
                            raise DeviceError(f"enabling peer access GPU {i} -> {j} failed: {e}") from None
        self.n = n_gpus
        self.devices = devices
        self.streams = []
        for i in devices:
            with cupy.cuda.Device(i):
                self.streams.append(cupy.cuda.Stream(non_blocking=True))
        self.names = [kernels.device_strings(rt.getDeviceProperties(i))[0] for i in devices]

    def synchronize(self):
        for s in self.streams:
            s.synchronize()


class Comm:
    """Per-rank flags + double-buffered payload slots of up to ``max_bytes`` per rank.

    Slots are 2 * max_bytes: the LL all-reduce sends 8-byte words of 4 payload bytes + epoch.
    """

    def __init__(self, peers: Peers, max_bytes: int = 64 * 1024, timeout_s: float = 1.0):
        cupy = _cupy()
        self.peers = peers
        self.timeout_ns = int(timeout_s * 1e9)     # a wait longer than this fails the launch
        n = peers.n
        self.max_bytes = max_bytes
        self.slot_bytes = (2 * max_bytes + 255) // 256 * 256
        self.bufs, self.tables, recv, flags = [], [], [], []
        dev = peers.devices
        for i in range(n):
            with cupy.cuda.Device(dev[i]):
                # flags: [MAX_BLOCKS][n] u32 epochs; recv: [2 parity][n source][slot_bytes]
                buf = cupy.zeros(FLAG_BYTES + 2 * n * self.slot_bytes, dtype=cupy.uint8)
            self.bufs.append(buf)
            flags.append(buf.data.ptr)
            recv.append(buf.data.ptr + FLAG_BYTES)
        table = np.zeros(PEER_TABLE_WORDS, np.uint64)
        table[:n] = recv
        table[MAX_RANKS:MAX_RANKS + n] = flags
        for i in range(n):
            with cupy.cuda.Device(dev[i]):
                self.tables.append(cupy.asarray(table))
        self.epoch = 0      # last epoch used; the next collective is epoch + 1
        self._functions = {}

    def function(self, rank: int, dtype: str):
        """The kccl_test kernel for `dtype`, loaded on rank's GPU."""
        key = (rank, dtype)
        if key not in self._functions:
            cupy = _cupy()
            with cupy.cuda.Device(self.peers.devices[rank]):
                mod = kernels.load_module(kernels.inline_source("kccl_test.cu"),
                                          {"KCCL_TIMEOUT_NS": f"{self.timeout_ns}ull"})
                name = "kccl_test_f32" if dtype == "float32" else "kccl_test_bf16"
                self._functions[key] = kernels.get_function(mod, name)
        return self._functions[key]

    def run_test(self, op: str, dtype: str, n_elems: int, steps: int, n_blocks: int = 1,
                 threads: int = 256, out_steps: int | None = None, warm_steps: int = 0):
        """Run `steps` collectives back to back in one launch per rank.

        Returns (outs, ns_per_step, epoch0): outs[rank] is a host array [out_steps, n_elems]
        (all-reduce, fp32) or [out_steps, n_ranks, n_elems] (all-gather, float32 or uint16
        bf16 bits); ns_per_step is block 0's %globaltimer time over steps after `warm_steps`,
        per step, for each rank (None when warm_steps == 0).
        """
        cupy = _cupy()
        n, code = self.peers.n, OPS[op]
        per_chunk = 16 // DTYPES[dtype]
        if n_elems % per_chunk or n_elems * DTYPES[dtype] > self.max_bytes:
            raise DeviceError(f"KCCL payload of {n_elems} {dtype} must be a multiple of 16 bytes "
                              f"and at most {self.max_bytes} bytes")
        if op == "all_reduce_tagged" and n_elems * 8 > self.slot_bytes:
            raise DeviceError(f"KCCL tagged all-reduce of {n_elems} elements needs "
                              f"{n_elems * 8} bytes of slot, have {self.slot_bytes}")
        if op.endswith("simple"):
            n_blocks = 1
        if not 1 <= n_blocks <= MAX_BLOCKS or threads < n:
            raise DeviceError(f"bad KCCL launch: {n_blocks} blocks of {threads} threads")
        out_steps = out_steps or steps
        gather = op.startswith("all_gather")
        shape = (out_steps, n, n_elems) if gather else (out_steps, n_elems)
        odt = (np.uint16 if dtype == "bfloat16" else np.float32) if gather else np.float32
        epoch0 = self.epoch
        outs, times, status = [], [], []
        funcs = [self.function(r, dtype) for r in range(n)]
        dev = self.peers.devices
        for r in range(n):
            with cupy.cuda.Device(dev[r]):
                outs.append(cupy.zeros(shape, odt))
                times.append(cupy.zeros(2, cupy.uint64))
                status.append(cupy.zeros(1, cupy.uint32))
        self.peers.synchronize()
        for r in range(n):
            with cupy.cuda.Device(dev[r]), self.peers.streams[r]:
                funcs[r]((n_blocks,), (threads,),
                         (self.tables[r], np.int32(r), np.int32(n), np.uint64(self.slot_bytes),
                          np.int32(n_elems), np.int32(steps), np.uint32(epoch0 & 0xFFFFFFFF),
                          np.int32(code), outs[r], np.int32(out_steps), np.int32(warm_steps),
                          times[r], status[r]))
        self.peers.synchronize()
        self.epoch += steps
        bad = [r for r in range(n) if int(status[r].get()[0])]
        if bad:
            raise DeviceError(f"KCCL {op} timed out on ranks {bad} (a peer's flag never came)")
        ns = None
        if warm_steps:
            t = [times[r].get() for r in range(n)]
            ns = [float(int(x[1]) - int(x[0])) / (steps - warm_steps) for x in t]
        return [o.get() for o in outs], ns, epoch0


# ---- host mirror of kccl_test.cu's data --------------------------------------------------
def _hash(rank, epoch, i):
    """kccl_test_value's hash, in uint32 arithmetic (wrapping like the GPU's)."""
    with np.errstate(over="ignore"):
        i = np.asarray(i, np.uint32)
        e = np.asarray(epoch, np.uint32)
        h = (i * np.uint32(0x9E3779B1)) ^ (e * np.uint32(0x85EBCA77)
                                            + np.uint32(rank) * np.uint32(0xC2B2AE3D)
                                            + np.uint32(0x27D4EB2F))
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x2C1B3C6D)
        h ^= h >> np.uint32(12)
        h *= np.uint32(0x297A2D39)
        h ^= h >> np.uint32(15)
    return h


def step_values(rank: int, epochs, n_elems: int, dtype: str) -> np.ndarray:
    """[len(epochs), n_elems] fp32 values rank sends at those epochs (bf16: truncated)."""
    h = _hash(rank, np.asarray(epochs, np.uint32)[:, None], np.arange(n_elems, dtype=np.uint32))
    v = ((h >> np.uint32(8)).astype(np.int64) - 0x800000).astype(np.float32) / np.float32(8388608.0)
    if dtype == "bfloat16":
        v = (v.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    return v


def bf16_bits(v: np.ndarray) -> np.ndarray:
    return (v.view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def expected_all_reduce(n_ranks: int, epochs, n_elems: int, dtype: str) -> np.ndarray:
    """fp32 sums in rank order 0..n-1, as the kernel adds them."""
    acc = np.zeros((len(epochs), n_elems), np.float32)
    for r in range(n_ranks):
        acc = acc + step_values(r, epochs, n_elems, dtype)
    return acc
