"""Decode speed of monokernel tuning variants on random GPU weights (one device call).

    python scripts/tune_monokernel.py llama-3.2-1b,qwen3-1.7b '[{}, {"KOG_DYN_PERMILLE": 50}]' [new]
    python scripts/tune_monokernel.py llama-3.2-1b@8000 '[{}, {"KOG_ATTN_TILE": 128, "KOG_ATTN_BUFS": 3}]'
    python scripts/tune_monokernel.py --summarize OUTPUT.txt      # the tables again, no GPU

A shape may carry `@position`: generation starts after that many prompt tokens (KV bytes are
counted in the % of read bandwidth). Repeat the variants to interleave rounds, e.g.
'[{}, {"KOG_X": 1}, {}, {"KOG_X": 1}]'. The output is one JSON line a run, then a table (each
row's speed relative to the first variant of its shape), then each variant's mean over its
rounds against the mean of its shape's first variant (the baseline), with every round's change
against that mean. --summarize reads the JSON lines of a saved output and prints the tables.
"""
from __future__ import annotations

import json
import sys
if {"-h", "--help"} & set(sys.argv[1:]):      # usage: the docstring above
    print(__doc__.strip())
    sys.exit(0)

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])


def print_tables(rows: list[dict]) -> None:
    """The run table, then the means over rounds (see the docstring)."""
    print(f"read BW {rows[0]['read_bandwidth_Bps'] / 1e9:.0f} GB/s on {rows[0]['gpu']}")
    print(f"{'shape':18s} {'tok/s':>8s} {'step_us':>8s} {'GB/s':>6s} {'%BW':>6s} {'vs1st':>6s}  tuning")
    first = {}
    for r in rows:
        base = first.setdefault(r["shape"], r["tokens_per_s"])
        print(f"{r['shape']:18s} {r['tokens_per_s']:8.1f} {r['step_us']:8.1f} "
              f"{r['achieved_Bps'] / 1e9:6.0f} {r['pct_of_read_bw']:5.1f}% {r['tokens_per_s'] / base:6.3f}"
              f"  {json.dumps(r['tuning'])}")
    runs: dict[str, dict[str, list[float]]] = {}      # shape -> tuning -> tok/s of each round
    for r in rows:
        runs.setdefault(r["shape"], {}).setdefault(json.dumps(r["tuning"], sort_keys=True),
                                                   []).append(r["tokens_per_s"])
    print("means over rounds: tok/s, change of the mean against the shape's first variant's "
          "mean (each round's change)")
    for shape, by_tuning in runs.items():
        base_runs = next(iter(by_tuning.values()))
        base = sum(base_runs) / len(base_runs)
        for i, (tun, tps) in enumerate(by_tuning.items()):
            mean = sum(tps) / len(tps)
            each = " / ".join(f"{100 * (t / base - 1):+.2f}" for t in tps)
            change = f"baseline ({each})" if i == 0 else f"{100 * (mean / base - 1):+.2f} % ({each})"
            print(f"{shape:18s} {mean:8.1f}  n={len(tps)}  {change:30s}  {tun}")


if len(sys.argv) > 2 and sys.argv[1] == "--summarize":
    try:
        with open(sys.argv[2], encoding="utf-8") as f:
            saved = [json.loads(line) for line in f if line.startswith("{")]
    except (OSError, ValueError) as e:
        sys.exit(f"{sys.argv[2]}: {getattr(e, 'strerror', None) or e}")
    if not saved:
        sys.exit(f"{sys.argv[2]}: no JSON lines of tune_monokernel.py runs")
    print_tables(saved)
    sys.exit(0)

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
if rows:
    print_tables(rows)
