"""Where a decode step's time goes: per-stage %globaltimer stamps of every block at one
position (MonokernelBackend(profile_pos=...)), summarised over layers.

    python scripts/profile_monokernel.py llama-3.2-1b [position] [tuning-json]

span: last block's end of this stage - last end of the previous stage (critical path).
prop: first block with its inputs - last producer end of the previous stage.
spread: last block with inputs - first block with inputs.  work: median end - inputs.
"""
from __future__ import annotations

import json
import sys

import numpy as np

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from kogcupy.gpu.device_weights import DeviceModel  # noqa: E402
from kogcupy.gpu.monokernel import MonokernelBackend  # noqa: E402
from kogcupy.model.random_weights import shape_config  # noqa: E402
from kogcupy.sampling_params import SamplingParams  # noqa: E402

name = sys.argv[1]
pos = int(sys.argv[2]) if len(sys.argv) > 2 else 100
tuning = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
cfg = shape_config(name)
ctx = max(2048, pos + 64)
dev = DeviceModel.random(cfg, rope_positions=ctx)
be = MonokernelBackend(device_model=dev, context_length=ctx, profile_pos=pos, tuning=tuning)
ids = list(range(1, 33))
list(be.start(ids, SamplingParams(), pos - 32 + 8, set()))
P = be.stage_profile().astype(np.int64)          # (B, slots)
L = cfg.n_layers
names = ["qkv", "attention", "o_proj", "gate_up", "down"]


def stats(slot0):
    s, i, e = P[:, slot0], P[:, slot0 + 1], P[:, slot0 + 2]
    has = i > 0
    return s, i, e, has


t0 = P[P > 0].min()
rows = {n: [] for n in names}
prev_end = None
for layer in range(L):
    for k, n in enumerate(names):
        s, i, e, has = stats(layer * 16 + 3 * k)
        last_end = e[has].max() if has.any() else np.nan
        first_in, last_in = (i[has].min(), i[has].max()) if has.any() else (np.nan, np.nan)
        work = np.median(e[has] - i[has]) if has.any() else np.nan
        span = last_end - prev_end if prev_end is not None else np.nan
        prop = first_in - prev_end if prev_end is not None else np.nan
        rows[n].append((span, prop, last_in - first_in, work, int(has.sum())))
        prev_end = last_end
s, i, e, has = stats(L * 16)
lm = (e[has].max() - prev_end, i[has].min() - prev_end, i[has].max() - i[has].min(),
      np.median(e[has] - i[has]), int(has.sum()))
samp = P[0, L * 16 + 3:L * 16 + 6]
print(f"{name} position {pos} blocks {be.n_blocks} tuning {tuning}")
print(f"{'stage':10s} {'span_us':>8s} {'prop_us':>8s} {'spread':>8s} {'work_us':>8s} {'blocks':>6s}  (mean over layers)")
total = 0.0
for n in names:
    a = np.array([r[:4] for r in rows[n]], dtype=np.float64) / 1e3
    m = np.nanmean(a, axis=0)
    total += np.nansum(a[:, 0])
    print(f"{n:10s} {m[0]:8.2f} {m[1]:8.2f} {m[2]:8.2f} {m[3]:8.2f} {rows[n][0][4]:6d}")
print(f"{'lm_head':10s} {lm[0] / 1e3:8.2f} {lm[1] / 1e3:8.2f} {lm[2] / 1e3:8.2f} {lm[3] / 1e3:8.2f} {lm[4]:6d}")
print(f"sampler: wait {(samp[1] - samp[0]) / 1e3:.2f} us, sample+embed {(samp[2] - samp[1]) / 1e3:.2f} us")
first_qkv_start = P[:, 0][P[:, 0] > 0].min()
print(f"layers total {total / 1e3:.1f} us; step (first qkv start -> sampler end) "
      f"{(samp[2] - first_qkv_start) / 1e3:.1f} us")
