"""Decode speed of monokernel tuning variants on random GPU weights (one device call).

    python scripts/tune_monokernel.py llama-3.2-1b,qwen3-1.7b '[{"KOG_GEMV_AB": 1}, {}]'
"""
from __future__ import annotations

import json
import sys

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from kogcupy.monokernel import DeviceModel, bench_decode  # noqa: E402
from kogcupy.random_weights import shape_config  # noqa: E402

shapes = sys.argv[1].split(",")
variants = json.loads(sys.argv[2]) if len(sys.argv) > 2 else [{}]
new = int(sys.argv[3]) if len(sys.argv) > 3 else 256
rows = []
for name in shapes:
    cfg = shape_config(name)
    dev = DeviceModel.random(cfg, rope_positions=1024)
    for tun in variants:
        r = bench_decode(cfg, prompt_len=32, new_tokens=new, device_model=dev, tuning=tun,
                         context_length=1024)
        r.update(shape=name, tuning=tun)
        rows.append(r)
        print(json.dumps(r), flush=True)
    del dev
print(f"read BW {rows[0]['read_bandwidth_Bps'] / 1e9:.0f} GB/s on {rows[0]['gpu']}")
print(f"{'shape':14s} {'tok/s':>8s} {'step_us':>8s} {'GB/s':>6s} {'%BW':>6s}  tuning")
for r in rows:
    print(f"{r['shape']:14s} {r['tokens_per_s']:8.1f} {r['step_us']:8.1f} "
          f"{r['achieved_Bps'] / 1e9:6.0f} {r['pct_of_read_bw']:5.1f}%  {json.dumps(r['tuning'])}")
