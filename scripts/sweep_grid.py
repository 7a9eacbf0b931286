#!/usr/bin/env python3
"""Decode tok/s of the monokernel over grid sizes and GPU counts (random bf16 weights, 32-token
prompt, greedy). One line of JSON per configuration, a table last.

    python scripts/sweep_grid.py qwen3-1.7b:4:132,66,33 smollm2-135m:1:132,66

Each argument is shape:n_gpus:blocks[,blocks...][:threads].
"""
from __future__ import annotations

import json
import sys
if {"-h", "--help"} & set(sys.argv[1:]):      # usage: the docstring above
    print(__doc__.strip())
    sys.exit(0)

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from kogcupy.gpu.device_weights import DeviceModel, _cupy  # noqa: E402
from kogcupy.gpu.measure import bench_decode  # noqa: E402
from kogcupy.model.random_weights import shape_config  # noqa: E402


def main(argv):
    cp = _cupy()
    rows = []
    for arg in argv:
        parts = arg.split(":")
        name, n = parts[0], int(parts[1])
        grids = [int(b) for b in parts[2].split(",")]
        threads = int(parts[3]) if len(parts) > 3 else 512
        cfg = shape_config(name)
        with cp.cuda.Device(0):
            dev = DeviceModel.random(cfg, "bfloat16", 0, rope_positions=600)
        for blocks in grids:
            try:
                r = bench_decode(cfg, prompt_len=32, new_tokens=512, device_model=dev,
                                 context_length=560, n_gpus=n, blocks=blocks, threads=threads)
                row = {"shape": name, "n_gpus": n, "blocks": blocks, "threads": threads,
                       "tokens_per_s": round(r["tokens_per_s"], 1), "step_us": round(r["step_us"], 1),
                       "pct_of_read_bw": round(r["pct_of_read_bw"], 1)}
            except Exception as e:  # noqa: BLE001 -- one bad configuration must not end the sweep
                row = {"shape": name, "n_gpus": n, "blocks": blocks, "threads": threads,
                       "error": f"{type(e).__name__}: {e}"[:200]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del dev
        cp.get_default_memory_pool().free_all_blocks()
    print(f"{'shape':<14}{'gpus':>5}{'blocks':>7}{'thr':>5}{'tok/s':>9}{'step_us':>9}{'%bw':>7}")
    for r in rows:
        print(f"{r['shape']:<14}{r['n_gpus']:>5}{r['blocks']:>7}{r['threads']:>5}"
              f"{r.get('tokens_per_s', float('nan')):>9.1f}{r.get('step_us', float('nan')):>9.1f}"
              f"{r.get('pct_of_read_bw', float('nan')):>7.1f}  {r.get('error', '')[:60]}")


if __name__ == "__main__":
    main(sys.argv[1:])
