"""KCCL in-kernel collectives across GPUs (kernels_src/kccl.cuh through kccl_test.cu).

Each launch runs >= 1000 collectives back to back inside one persistent kernel per rank, on
fresh data every step (a hash of rank, epoch, index that kogcupy.gpu.kccl mirrors on the host),
so a flag reused too early or a payload slot overwritten while a peer still reads it shows
up as a wrong value. Sums are fp32 in rank order 0..n-1 on every rank; the host adds in the
same order, so results must match exactly (and be bit-identical across ranks).

The `multigpu` tests need CuPy and >= 2 peer-capable GPUs and skip otherwise; the host-side
tests at the top run everywhere.
"""
from __future__ import annotations

import numpy as np
import pytest

from kogcupy.gpu import kccl
from kogcupy.errors import DeviceError

N_GPUS = kccl.gpu_count()

STEPS = 1000
FAST_BLOCKS = 16
# Element counts: the models' hidden sizes, then 4 KB, 16 KB and 64 KB payloads.
HIDDEN = (576, 896, 2048)
PAYLOAD_BYTES = (4096, 16384, 65536)


def sizes(dtype):
    return [*HIDDEN, *(b // kccl.DTYPES[dtype] for b in PAYLOAD_BYTES)]


CASES = [(d, n) for d in ("float32", "bfloat16") for n in sizes(d)]


# ---- host side (CPU) -----------------------------------------------------------------------
def test_step_values_exact_and_fresh():
    v = kccl.step_values(0, np.arange(1, 4), 4096, "float32")
    assert v.shape == (3, 4096) and v.dtype == np.float32
    assert np.all(np.abs(v) <= 1.0)
    assert np.all(v * np.float32(8388608.0) == np.round(v * np.float32(8388608.0)))
    assert not np.array_equal(v[0], v[1])                  # every epoch different
    assert not np.array_equal(v, kccl.step_values(1, np.arange(1, 4), 4096, "float32"))
    b = kccl.step_values(0, [1], 64, "bfloat16")
    assert np.all(b.view(np.uint32) & 0xFFFF == 0)


def test_peers_error_is_device_error():
    with pytest.raises(DeviceError):
        kccl.Peers(max(N_GPUS + 1, 2) if N_GPUS < kccl.MAX_RANKS else kccl.MAX_RANKS + 1)


# ---- device ----------------------------------------------------------------------------------
_COMMS = {}


def comm(n):
    if n not in _COMMS:
        _COMMS[n] = kccl.Comm(kccl.Peers(n), max_bytes=64 * 1024)
    return _COMMS[n]


def gpu_counts():
    return [2] + ([N_GPUS] if N_GPUS > 2 else [])


def final_steps(steps, out_steps):
    """Which step's result each out row holds at the end (row j: last s with s % out == j)."""
    j = np.arange(out_steps)
    return j + out_steps * ((steps - 1 - j) // out_steps)


def out_steps_for(n_elems, dtype):
    # Check every step up to 16 KB; a ring of the last 250 steps for 64 KB (host time).
    return STEPS if n_elems * kccl.DTYPES[dtype] <= 16384 else 250


def check_all_reduce(c, op, dtype, n_elems, n_blocks):
    out_steps = out_steps_for(n_elems, dtype)
    outs, _, epoch0 = c.run_test(op, dtype, n_elems, STEPS, n_blocks=n_blocks,
                                 out_steps=out_steps)
    epochs = epoch0 + 1 + final_steps(STEPS, out_steps)
    want = kccl.expected_all_reduce(c.peers.n, epochs, n_elems, dtype)
    for r, got in enumerate(outs):
        bad = np.argwhere(got != want)
        assert bad.size == 0, (f"rank {r}: {len(bad)} wrong sums, first at (row, i) = "
                               f"{tuple(bad[0])}: got {got[tuple(bad[0])]}, "
                               f"want {want[tuple(bad[0])]}")
    for r in range(1, len(outs)):
        assert outs[r].tobytes() == outs[0].tobytes()


def check_all_gather(c, op, dtype, n_elems, n_blocks):
    out_steps = out_steps_for(n_elems, dtype)
    outs, _, epoch0 = c.run_test(op, dtype, n_elems, STEPS, n_blocks=n_blocks,
                                 out_steps=out_steps)
    epochs = epoch0 + 1 + final_steps(STEPS, out_steps)
    want = np.stack([kccl.step_values(p, epochs, n_elems, dtype) for p in range(c.peers.n)],
                    axis=1)
    if dtype == "bfloat16":
        want = kccl.bf16_bits(want)
    for r, got in enumerate(outs):
        bad = np.argwhere(got != want)
        assert bad.size == 0, f"rank {r}: {len(bad)} wrong words, first at {tuple(bad[0])}"


@pytest.mark.parametrize("n_gpus", gpu_counts())
@pytest.mark.parametrize("op", ["all_reduce_simple", "all_reduce", "all_reduce_ll"])
@pytest.mark.parametrize("dtype,n_elems", CASES)
@pytest.mark.multigpu
@pytest.mark.skipif(N_GPUS < 2, reason="needs CuPy and >= 2 GPUs")
def test_all_reduce(n_gpus, op, dtype, n_elems):
    check_all_reduce(comm(n_gpus), op, dtype, n_elems, FAST_BLOCKS)


@pytest.mark.parametrize("n_gpus", gpu_counts())
@pytest.mark.parametrize("dtype,n_elems", [c for c in CASES if c[1] * 8 <= 2 * 64 * 1024])
@pytest.mark.multigpu
@pytest.mark.skipif(N_GPUS < 2, reason="needs CuPy and >= 2 GPUs")
def test_all_reduce_tagged(n_gpus, dtype, n_elems):
    # the tensor-parallel monokernel's element-wise tagged all-reduce (8 bytes per element)
    check_all_reduce(comm(n_gpus), "all_reduce_tagged", dtype, n_elems, FAST_BLOCKS)


@pytest.mark.parametrize("n_gpus", gpu_counts())
@pytest.mark.parametrize("op", ["all_gather_simple", "all_gather"])
@pytest.mark.parametrize("dtype,n_elems", CASES)
@pytest.mark.multigpu
@pytest.mark.skipif(N_GPUS < 2, reason="needs CuPy and >= 2 GPUs")
def test_all_gather(n_gpus, op, dtype, n_elems):
    check_all_gather(comm(n_gpus), op, dtype, n_elems, FAST_BLOCKS)


@pytest.mark.parametrize("n_blocks", [1, 132])
@pytest.mark.multigpu
@pytest.mark.skipif(N_GPUS < 2, reason="needs CuPy and >= 2 GPUs")
def test_fast_block_counts(n_blocks):
    # 132 blocks over 72 chunks (576 bf16): most blocks own nothing and must still publish.
    c = comm(2)
    check_all_reduce(c, "all_reduce", "bfloat16", 576, n_blocks)
    check_all_reduce(c, "all_reduce_ll", "bfloat16", 576, n_blocks)
    check_all_gather(c, "all_gather", "bfloat16", 576, n_blocks)


@pytest.mark.multigpu
@pytest.mark.skipif(N_GPUS < 2, reason="needs CuPy and >= 2 GPUs")
def test_epochs_carry_over_launches():
    c = comm(2)
    before = c.epoch
    for _ in range(3):
        check_all_reduce(c, "all_reduce", "float32", 896, FAST_BLOCKS)
    assert c.epoch == before + 3 * STEPS
