"""Decode speed of monokernel tuning variants on random GPU weights (one device call).

    python scripts/tune_monokernel.py llama-3.2-1b,qwen3-1.7b '[{"KOG_DYN_PERMILLE": 0}, {}]' [new]
    python scripts/tune_monokernel.py llama-3.2-1b@8000 '[{}, {"KOG_ATTN_TILE": 128, "KOG_ATTN_BUFS": 3}]'

A shape may carry `@position`: generation starts after that many prompt tokens (KV bytes are
counted in the % of read bandwidth). The table ends with each row's speed relative to the
first variant of its shape.
"""
from __future__ import annotations

import json
import sys
if {"-h", "--help"} & set(sys.argv[1:]):      # usage: the docstring above
    print(__doc__.strip())
    sys.exit(0)

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from kogcupy.errors import DeviceError  # noqa: E402
from kogcupy.gpu.device_weights import DeviceModel  # noqa: E402
from kogcupy.gpu.measure import bench_decode  # noqa: E402
from kogcupy.model.random_weights import shape_config  # noqa: E402

shapes = sys.argv[1].split(",")
variants = json.loads(sys.argv[2]) if len(sys.argv) > 2 else [{}]
new = int(sys.argv[3]) if len(sys.argv) > 3 else 256
rows = []
for spec in shapes:
    name, _, pos = spec.partition("@")
    pos = int(pos or 0)
    cfg = shape_config(name)
    ctx = max(1024, pos + new + 16)
    dev = DeviceModel.random(cfg, rope_positions=ctx)
    for tun in variants:
        try:
            r = bench_decode(cfg, prompt_len=32, new_tokens=new, device_model=dev, tuning=tun,
                             context_length=ctx, position=pos)
        except DeviceError as e:          # e.g. a variant that needs more shared memory
            print(f"{spec} {json.dumps(tun)}: {e}", flush=True)
            continue
        r.update(shape=spec, tuning=tun)
        rows.append(r)
        print(json.dumps(r), flush=True)
    del dev
print(f"read BW {rows[0]['read_bandwidth_Bps'] / 1e9:.0f} GB/s on {rows[0]['gpu']}")
print(f"{'shape':18s} {'tok/s':>8s} {'step_us':>8s} {'GB/s':>6s} {'%BW':>6s} {'vs1st':>6s}  tuning")
first = {}
for r in rows:
    base = first.setdefault(r["shape"], r["tokens_per_s"])
    print(f"{r['shape']:18s} {r['tokens_per_s']:8.1f} {r['step_us']:8.1f} "
          f"{r['achieved_Bps'] / 1e9:6.0f} {r['pct_of_read_bw']:5.1f}% {r['tokens_per_s'] / base:6.3f}"
          f"  {json.dumps(r['tuning'])}")
