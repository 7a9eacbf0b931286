#!/usr/bin/env python3
"""In-kernel all-reduce latency (KCCL) vs torch.distributed NCCL all_reduce, same sizes.

KCCL: one launch per rank runs `--steps` all-reduces back to back inside one persistent
kernel (kernels_src/kccl_test.cu, fresh hashed data each step, fp32 sums); a step's time is
block 0's %globaltimer over the steps after `--warm`, divided by their number (it includes
making the step's data and writing the fp32 result). The last steps' results are checked.
Variants: the one-block simple oracle, the sliced fast version (flags), the LL version
(epoch-tagged 8-byte words, no flags) and the tensor-parallel monokernel's element-wise tagged
all-reduce, each sliced one for several block counts.

NCCL: one process per GPU (torch.multiprocessing spawn), all_reduce of a tensor of the same
dtype and byte size (NCCL sums bf16 in bf16), CUDA events around `--iters` back-to-back
calls, median of `--reps`; eager and, unless --no-graph, replayed from a CUDA graph. NVLink
multicast stays off (NCCL_NVLS_ENABLE=0 and friends, set before torch is imported).

    python3 scripts/bench_kccl.py --gpus 2 --out bench/results/     # table printed last
"""
from __future__ import annotations

import os

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
               ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_k] = _v

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ESIZE = {"float32": 4, "bfloat16": 2}


# ---- KCCL ------------------------------------------------------------------------------------
def bench_kccl(n_gpus, sizes, dtypes, blocks_list, steps, warm, reps):
    import numpy as np
    from kogcupy.gpu import kccl
    peers = kccl.Peers(n_gpus)
    comm = kccl.Comm(peers, max_bytes=max(sizes))
    variants = ([("all_reduce_simple", 1)] + [("all_reduce", b) for b in blocks_list]
                + [("all_reduce_ll", b) for b in blocks_list])
    rows = []
    for dtype in dtypes:
        for nbytes in sizes:
            n_el = nbytes // ESIZE[dtype]
            # the monokernel's element-wise tagged all-reduce: 8 bytes per element in a slot
            tagged = [("all_reduce_tagged", b) for b in blocks_list] if n_el * 8 <= comm.slot_bytes else []
            for op, blocks in variants + tagged:
                per_launch, ok = [], True
                for _ in range(reps):
                    outs, ns, epoch0 = comm.run_test(op, dtype, n_el, steps, n_blocks=blocks,
                                                     out_steps=2, warm_steps=warm)
                    per_launch.append(max(ns))
                    last = np.arange(2) + 2 * ((steps - 1 - np.arange(2)) // 2)  # row j: s % 2 == j
                    want = kccl.expected_all_reduce(n_gpus, epoch0 + 1 + last, n_el, dtype)
                    ok &= all(np.array_equal(o, want) for o in outs)
                r = {"impl": "kccl", "op": op, "blocks": blocks, "dtype": dtype,
                     "bytes": nbytes, "elems": n_el, "n_gpus": n_gpus,
                     "us": statistics.median(per_launch) / 1e3,
                     "us_all": [x / 1e3 for x in per_launch], "correct": bool(ok)}
                rows.append(r)
                print(json.dumps(r), flush=True)
    return rows, peers.names


# ---- NCCL (one process per GPU) --------------------------------------------------------------
def _nccl_worker(rank, n, port, sizes, dtypes, iters, reps, graph, out_path):
    for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                 ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ[k] = v
    import torch
    import torch.distributed as dist
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=n, device_id=torch.device("cuda", rank))
    rows = []

    def save():             # after every measurement: a later hang keeps what was measured
        if rank == 0:
            Path(out_path).write_text(json.dumps(rows))

    def timed(fn, count):
        ts = []
        for _ in range(reps):
            dist.barrier()
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) * 1e3 / count)
        return ts

    cases = [(d, b) for d in dtypes for b in sizes]
    tensors = {}
    for dtype, nbytes in cases:             # eager first, for every size
        tdt = torch.float32 if dtype == "float32" else torch.bfloat16
        x = tensors[dtype, nbytes] = torch.zeros(nbytes // ESIZE[dtype], dtype=tdt, device="cuda")
        for _ in range(20):
            dist.all_reduce(x)

        def eager():
            for _ in range(iters):
                dist.all_reduce(x)
        ts = timed(eager, iters)
        rows.append({"impl": "nccl", "mode": "eager", "dtype": dtype, "bytes": nbytes,
                     "n_gpus": n, "us": statistics.median(ts), "us_all": ts})
        save()
    for dtype, nbytes in cases if graph else []:     # then replayed from CUDA graphs
        x = tensors[dtype, nbytes]
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    dist.all_reduce(x)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(iters):
                    dist.all_reduce(x)
            g.replay()
            torch.cuda.synchronize()
            ts = timed(g.replay, iters)
            rows.append({"impl": "nccl", "mode": "graph", "dtype": dtype, "bytes": nbytes,
                         "n_gpus": n, "us": statistics.median(ts), "us_all": ts})
        except Exception as e:  # noqa: BLE001 -- report, keep the eager numbers
            rows.append({"impl": "nccl", "mode": "graph", "dtype": dtype, "bytes": nbytes,
                         "n_gpus": n, "us": None, "error": repr(e)})
            save()
            break
        save()
    # No teardown: on nvidia-h200-x2 (2026-11-22) the workers never returned from the final
    # barrier/destroy after the graph replays (all rows were saved). Rank 0 has written
    # everything; leave at once so the parent need not kill anyone.
    torch.cuda.synchronize()
    os._exit(0)


def bench_nccl(n_gpus, sizes, dtypes, iters, reps, graph, limit_s):
    """NCCL rows measured within limit_s (workers still running then are killed)."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "nccl.json")
        ctx = mp.spawn(_nccl_worker, args=(n_gpus, port, sizes, dtypes, iters, reps, graph, path),
                       nprocs=n_gpus, join=False)
        deadline = time.monotonic() + limit_s
        error = None
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    error = f"NCCL workers still running after {limit_s} s: killed"
                    for p in ctx.processes:
                        if p.is_alive():
                            p.kill()
                    break
        except Exception as e:  # noqa: BLE001 -- a worker failed: keep what it saved
            error = repr(e)
        rows = json.loads(Path(path).read_text()) if os.path.exists(path) else []
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows, error


# ---- table -----------------------------------------------------------------------------------
def table(rows, names, n_gpus):
    def get(impl, dtype, nbytes, **kw):
        return [r for r in rows if r["impl"] == impl and r["dtype"] == dtype
                and r["bytes"] == nbytes and all(r.get(k) == v for k, v in kw.items())]

    def fmt(v):
        return f"{v:8.2f}" if isinstance(v, (int, float)) else f"{'-':>8}"

    lines = [f"KCCL in-kernel all-reduce vs NCCL, {n_gpus} x {names[0] if names else '?'}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; us per all-reduce (median)",
             f"{'dtype':9} {'bytes':>6} {'simple':>8} {'fast':>8} {'blocks':>6} "
             f"{'ll':>8} {'blocks':>6} {'tagged':>8} "
             f"{'nccl':>8} {'nccl_gr':>8} {'x_eager':>7} {'x_graph':>7} ok"]
    dtypes = sorted({r["dtype"] for r in rows}, reverse=True)
    sizes = sorted({r["bytes"] for r in rows})
    for dtype in dtypes:
        for nbytes in sizes:
            simple = get("kccl", dtype, nbytes, op="all_reduce_simple")
            fast = get("kccl", dtype, nbytes, op="all_reduce")
            best = min(fast, key=lambda r: r["us"]) if fast else None
            ll = get("kccl", dtype, nbytes, op="all_reduce_ll")
            best_ll = min(ll, key=lambda r: r["us"]) if ll else None
            l_us = best_ll["us"] if best_ll else None
            tg = get("kccl", dtype, nbytes, op="all_reduce_tagged")
            t_us = min(r["us"] for r in tg) if tg else None
            eager = get("nccl", dtype, nbytes, mode="eager")
            graph = get("nccl", dtype, nbytes, mode="graph")
            s_us = simple[0]["us"] if simple else None
            f_us = best["us"] if best else None
            e_us = eager[0]["us"] if eager else None
            g_us = graph[0]["us"] if graph else None
            k = min([x for x in (s_us, f_us, l_us) if x is not None], default=None)
            xe = f"{e_us / k:7.1f}" if k and e_us else f"{'-':>7}"
            xg = f"{g_us / k:7.1f}" if k and g_us else f"{'-':>7}"
            ok = all(r["correct"] for r in simple + fast + ll + tg)
            lines.append(f"{dtype:9} {nbytes:6d} {fmt(s_us)} {fmt(f_us)} "
                         f"{best['blocks'] if best else '-':>6} {fmt(l_us)} "
                         f"{best_ll['blocks'] if best_ll else '-':>6} {fmt(t_us)} {fmt(e_us)} {fmt(g_us)} "
                         f"{xe} {xg} {'yes' if ok else 'NO'}")
    lines.append("simple: one block (oracle); fast: flags, best block count; ll: tagged words, "
                 "best block count; tagged: the monokernel's element-wise tagged words, best "
                 "block count; x_*: NCCL time / best KCCL time")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=0, help="GPUs (default: all visible)")
    ap.add_argument("--sizes", default="4096,8192,16384,32768,65536", help="payload bytes")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--blocks", default="4,8,16,32", help="block counts of the fast version")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--warm", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--iters", type=int, default=200, help="NCCL calls per timing")
    ap.add_argument("--no-nccl", action="store_true")
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--nccl-limit-s", type=float, default=90.0,
                    help="kill the NCCL workers after this long (keeps what they measured)")
    ap.add_argument("--out", default="", help="JSON file, or a directory for bench_kccl.json")
    a = ap.parse_args()
    from kogcupy.gpu import kccl
    n = a.gpus or kccl.gpu_count()
    sizes = [int(s) for s in a.sizes.split(",")]
    dtypes = a.dtypes.split(",")
    rows, names = bench_kccl(n, sizes, dtypes, [int(b) for b in a.blocks.split(",")],
                             a.steps, a.warm, a.reps)
    nccl_error = None
    if not a.no_nccl:
        try:
            nrows, nccl_error = bench_nccl(n, sizes, dtypes, a.iters, max(a.reps, 5),
                                           not a.no_graph, a.nccl_limit_s)
            rows += nrows
        except Exception as e:  # noqa: BLE001 -- keep the KCCL numbers
            nccl_error = repr(e)
        if nccl_error:
            print(f"NCCL benchmark: {nccl_error}", flush=True)
    result = {"date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "gpus": names,
              "n_gpus": n, "steps": a.steps, "warm": a.warm, "rows": rows,
              "nccl_error": nccl_error,
              "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE",
                                                     "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                     "NVSHMEM_DISABLE_NVLS")}}
    text = table(rows, names, n)
    result["table"] = text
    if a.out:
        out = Path(a.out)
        if out.suffix != ".json":
            out.mkdir(parents=True, exist_ok=True)
            out = out / "bench_kccl.json"
        out.write_text(json.dumps(result, indent=1))
    print(text, flush=True)


if __name__ == "__main__":
    main()
