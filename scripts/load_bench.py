"""Load time and peak host memory (issue 15): each measurement in a fresh process.

    python scripts/load_bench.py make-hf /tmp/lb/hf-1b          # random Llama-3.2-1B-shape HF dir
    python scripts/load_bench.py measure PATH [PATH ...]        # table: load / reference / upload

Rows per model: ``load`` = load_model(); ``reference`` = load_model() + the NumPy reference
backend's weights; ``upload`` = load_model() + DeviceModel.from_packed() with CuPy replaced by
NumPy (weights_tools.testing.FakeCupy: the host side of the GPU upload; the "device" arrays,
the model in bf16/fp16, are host memory here and count in the RSS column, which also says
how much of it they are).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(path: str, what: str) -> dict:
    sys.path.insert(0, ROOT)
    import numpy as np

    from kogcupy.model.loader import load_model
    t0 = time.perf_counter()
    model = load_model(None if path == "default" else path)
    t_load = time.perf_counter() - t0
    dev_bytes = 0
    if what == "reference":
        from kogcupy.reference.backend import ReferenceBackend
        ReferenceBackend(model, context_length=64, prefix_cache_gb=0)
    elif what == "upload":
        from kogcupy.gpu import kernels
        from kogcupy.gpu.device_weights import DeviceModel
        from weights_tools.testing import FakeCupy
        kernels._cupy = lambda: FakeCupy()
        dev = DeviceModel.from_packed(model.config, model.weights, model.dtype)
        dev_bytes = sum(int(np.asarray(a).nbytes) for a in dev.arrays.values())
    t = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"path": path, "what": what, "load_s": t_load, "total_s": t, "peak_rss": rss,
            "device_bytes": dev_bytes}


def measure(paths, whats, repeat=1) -> list[dict]:
    rows = []
    for p in paths:
        for w in whats:
            best = None
            for _ in range(repeat):
                r = subprocess.run([sys.executable, __file__, "_child", p, w], capture_output=True,
                                   text=True)
                if r.returncode:
                    sys.exit(r.stderr[-3000:])
                row = json.loads(r.stdout.strip().splitlines()[-1])
                if best is None or row["total_s"] < best["total_s"]:
                    best = row
            rows.append(best)
            print(f"{os.path.basename(p.rstrip('/')):<40} {w:<10} load {best['load_s']:6.2f} s  "
                  f"total {best['total_s']:6.2f} s  peak RSS {best['peak_rss'] / 2**30:6.2f} GiB"
                  + (f" (of which fake device {best['device_bytes'] / 2**30:.2f} GiB)"
                     if best["device_bytes"] else ""), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-hf")
    m.add_argument("dir")
    m.add_argument("--shape", default="llama-3.2-1b")
    s = sub.add_parser("measure")
    s.add_argument("paths", nargs="+")
    s.add_argument("--what", default="load,reference,upload")
    s.add_argument("--repeat", type=int, default=1)
    s.add_argument("--json")
    c = sub.add_parser("_child")
    c.add_argument("path")
    c.add_argument("what")
    a = ap.parse_args()
    if a.cmd == "make-hf":
        sys.path.insert(0, ROOT)
        from weights_tools.testing import random_hf_checkpoint
        t = time.perf_counter()
        random_hf_checkpoint(a.dir, a.shape)
        print(f"wrote {a.dir} in {time.perf_counter() - t:.1f} s")
    elif a.cmd == "measure":
        rows = measure(a.paths, a.what.split(","), a.repeat)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)
    else:
        print(json.dumps(_child(a.path, a.what)))


if __name__ == "__main__":
    main()
