"""Loading a packed directory onto the GPU vs the raw disk -> GPU copy rate (issue 15).

On the device machine (repo root):

    python scripts/device_load.py                      # Llama-3.1-8B shape, /tmp/kogcupy-load
    python scripts/device_load.py --shape llama-3.2-1b --out $OUT

1. Writes a packed directory of the shape (random bf16 weights made on the GPU, written tensor
   by tensor as raw bits: the layout kogcupy-repack writes) under --dir, unless it is there.
2. Times, with the file dropped from the page cache first (cold: posix_fadvise DONTNEED after
   fsync; no root needed) and again with it cached (warm):
   - raw:     the file read in 64 MB chunks into two pinned buffers and copied to one GPU
              buffer (cudaMemcpyAsync, double-buffered): the disk -> GPU copy rate;
   - kogcupy: load_model(dir) + DeviceModel.from_packed(...) (what MonokernelBackend does
              before compiling), synchronized; the uploaded matrices are checked against the
              generated ones.
3. Prints a table (seconds, GB/s, % of raw) and the measuring process's peak host RSS (the
   timings run in a child process that never held the model on the host), and writes JSON to
   --out.

Target (issue 15): kogcupy >= 70% of the raw rate.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CHUNK = 64 << 20


def write_packed(cfg, directory: str, seed: int = 0):
    """A packed dir of random bf16 weights made on the GPU; returns the DeviceModel."""
    import cupy as cp

    from kogcupy.gpu.device_weights import DeviceModel
    from kogcupy.model.packing import (PACK_FORMAT, PACK_FORMAT_VERSION, default_rope_positions,
                                       packed_shapes)
    from kogcupy.model.weights import PACK_MARKER, PACKED_WEIGHTS_FILE
    from weights_tools.testing import write_tiny_tokenizer
    n_pos = default_rope_positions(cfg)
    dev = DeviceModel.random(cfg, seed=seed, rope_positions=n_pos)
    shapes = packed_shapes(cfg, n_pos)
    kinds = {k: ("F32" if k.startswith("rope") else "BF16") for k in shapes}
    header, off = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * (4 if kinds[name] == "F32" else 2)
        header[name] = {"dtype": kinds[name], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, PACKED_WEIGHTS_FILE)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            a = dev.arrays[name]
            if name == "w_gate_up":                  # device (L, f, 2, h) -> packed (L, 2f, h)
                for layer in range(cfg.n_layers):
                    f.write(cp.asnumpy(a[layer].transpose(1, 0, 2)).tobytes())
            elif name == "w_down":                   # device (L, f, h) -> packed (L, h, f)
                for layer in range(cfg.n_layers):
                    f.write(cp.asnumpy(a[layer].T).tobytes())
            elif a.ndim >= 3:
                for layer in range(a.shape[0]):
                    f.write(cp.asnumpy(a[layer]).tobytes())
            else:
                f.write(cp.asnumpy(a).tobytes())
        f.flush()
        os.fsync(f.fileno())
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f)
    write_tiny_tokenizer(directory, 300)
    with open(os.path.join(directory, PACK_MARKER), "w") as f:
        json.dump({"format": PACK_FORMAT, "version": PACK_FORMAT_VERSION, "dtype": "bfloat16",
                   "source": "scripts/device_load.py random"}, f)
    return dev


def drop_cache(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_copy(path: str) -> float:
    """Seconds to copy the whole file into one GPU buffer through two pinned buffers."""
    import cupy as cp
    size = os.path.getsize(path)
    dst = cp.empty(size, cp.uint8)
    bufs = [cp.cuda.alloc_pinned_memory(CHUNK) for _ in range(2)]
    views = [np.ndarray((CHUNK,), np.uint8, buffer=b) for b in bufs]
    events = [None, None]
    stream = cp.cuda.get_current_stream()
    rt = cp.cuda.runtime
    cp.cuda.runtime.deviceSynchronize()
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    done, i = 0, 0
    while done < size:
        n = min(CHUNK, size - done)
        if events[i] is not None:
            events[i].synchronize()
        mv, got = memoryview(views[i])[:n], 0
        while got < n:
            got += os.preadv(fd, [mv[got:]], done + got)
        rt.memcpyAsync(dst.data.ptr + done, bufs[i].ptr, n, rt.memcpyHostToDevice, stream.ptr)
        events[i] = cp.cuda.Event(disable_timing=True)
        events[i].record(stream)
        done += n
        i ^= 1
    stream.synchronize()
    t = time.perf_counter() - t0
    os.close(fd)
    del dst
    return t


def kogcupy_load(directory: str):
    """(seconds, DeviceModel): load_model + DeviceModel.from_packed, synchronized."""
    import cupy as cp

    from kogcupy.gpu.device_weights import DeviceModel
    from kogcupy.model.loader import load_model
    cp.cuda.runtime.deviceSynchronize()
    t0 = time.perf_counter()
    model = load_model(directory)
    dev = DeviceModel.from_packed(model.config, model.weights, "bfloat16")
    cp.cuda.runtime.deviceSynchronize()
    return time.perf_counter() - t0, dev


def measure(cfg, directory: str, out: str | None):
    """The timings (run in a child process: its peak RSS is the loading's)."""
    import cupy as cp

    from kogcupy.gpu.device_weights import DeviceModel, matrix_shapes
    from kogcupy.model.packing import ROPE_TABLES, default_rope_positions
    from kogcupy.model.weights import PACKED_WEIGHTS_FILE
    path = os.path.join(directory, PACKED_WEIGHTS_FILE)
    size = os.path.getsize(path)
    p = cp.cuda.runtime.getDeviceProperties(0)
    gpu = p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"])
    rows, dev = [], None
    t, dev = kogcupy_load(directory)           # imports, the CUDA context, the memory pool
    del dev
    for cache in ("cold", "warm"):
        for what in ("raw", "kogcupy"):
            if cache == "cold":
                drop_cache(path)
            dev = None
            cp.get_default_memory_pool().free_all_blocks()
            if what == "raw":
                s = raw_copy(path)
            else:
                s, dev = kogcupy_load(directory)
            rows.append({"case": what, "cache": cache, "s": s, "GB_per_s": size / s / 1e9})
            print(f"{what:<8} {cache:<5} {s:7.2f} s  {size / s / 1e9:6.2f} GB/s", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    want = DeviceModel.random(cfg, seed=0, rope_positions=default_rope_positions(cfg))
    for name in matrix_shapes(cfg):
        assert bool(cp.array_equal(dev.arrays[name], want.arrays[name])), name
    for name in ROPE_TABLES:
        assert bool(cp.allclose(dev.arrays[name], want.arrays[name])), name
    print("uploaded weights == generated weights")
    raw = {r["cache"]: r["s"] for r in rows if r["case"] == "raw"}
    for r in rows:
        r["pct_of_raw"] = 100.0 * raw[r["cache"]] / r["s"]
    print(f"\npacked dir, {size / 1e9:.2f} GB, {gpu}")
    print("| case | page cache | s | GB/s | % of raw |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['cache']} | {r['s']:.2f} | {r['GB_per_s']:.2f} | "
              f"{r['pct_of_raw']:.0f}% |")
    print(f"peak host RSS of the measuring process: {rss / 2**30:.2f} GiB (the model: "
          f"{size / 2**30:.2f} GiB; 0.13 GiB of pinned staging buffers)")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "device_load.json"), "w") as f:
            json.dump({"bytes": size, "gpu": gpu, "rows": rows, "peak_rss": rss}, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--dir", default="/tmp/kogcupy-load")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--keep", action="store_true", help="keep the packed dir afterwards")
    ap.add_argument("--_measure", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    import subprocess

    from kogcupy.model.random_weights import shape_config
    from kogcupy.model.weights import PACK_MARKER, PACKED_WEIGHTS_FILE
    cfg = shape_config(a.shape)
    directory = os.path.join(a.dir, a.shape)
    if a._measure:
        measure(cfg, directory, a.out)
        return
    if not os.path.isfile(os.path.join(directory, PACK_MARKER)):
        t = time.perf_counter()
        write_packed(cfg, directory)
        size = os.path.getsize(os.path.join(directory, PACKED_WEIGHTS_FILE))
        print(f"wrote {directory} ({size / 1e9:.2f} GB) in {time.perf_counter() - t:.1f} s",
              flush=True)
    try:
        cmd = [sys.executable, os.path.abspath(__file__), "--_measure", "--shape", a.shape,
               "--dir", a.dir] + (["--out", a.out] if a.out else [])
        rc = subprocess.call(cmd)
    finally:
        if not a.keep:
            import shutil
            shutil.rmtree(directory, ignore_errors=True)
    sys.exit(rc)


if __name__ == "__main__":
    main()
