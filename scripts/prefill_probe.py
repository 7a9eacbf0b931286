"""Quick device probe: cold TTFT of kogcupy's batched prefill vs a torch SDPA forward (same
shape, random bf16 weights). Prints one line per (shape, prompt length, attention kernel).

    python scripts/prefill_probe.py llama-3.2-1b,llama-3.1-8b [1000,8000,32000] [ws,mma]

The third argument compares the prefill attention kernels this GPU has (Prefill.attention_kernels),
interleaved in one process; by default the one kogcupy uses."""
import sys
if {"-h", "--help"} & set(sys.argv[1:]):      # usage: the docstring above
    print(__doc__.strip())
    sys.exit(0)
import time

import numpy as np

from kogcupy.gpu.device_weights import DeviceModel
from kogcupy.gpu.monokernel import MonokernelBackend
from kogcupy.model.random_weights import shape_config
from kogcupy.sampling_params import SamplingParams


def main(shapes=("llama-3.2-1b",), lens=(1000, 8000, 32000), kinds=None):
    for name in shapes:
        cfg = shape_config(name)
        ctx = max(lens) + 64
        dev = DeviceModel.random(cfg, "bfloat16", 0, rope_positions=ctx)
        be = MonokernelBackend(device_model=dev, context_length=ctx, prefix_cache_gb=0)
        missing = set(kinds or []) - set(be.prefill.attention_kernels)
        if missing:
            raise SystemExit(f"{name}: no {sorted(missing)} attention on this GPU "
                             f"(it has {be.prefill.attention_kernels})")
        for n, kind in ((n, k) for n in lens for k in (kinds or [be.prefill.attention])):
            be.prefill.attention = kind
            ids = np.random.default_rng(n).integers(0, cfg.vocab_size, n).tolist()
            be.prefill.run(ids, 0, n - 1)       # warm-up (compile, cuBLAS heuristics)
            be._stream.synchronize()
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                be.prefill.run(ids, 0, n - 1)
                be._stream.synchronize()
                ts.append(time.perf_counter() - t0)
            ttft = []
            for _ in range(2):
                be.clear_prefix_cache()
                s = be.start(ids, SamplingParams(), 1, set())
                t0 = time.perf_counter()
                next(s)
                ttft.append(time.perf_counter() - t0)
                list(s)
            print(f"{name} {kind} n={n} prefill_s={min(ts):.4f} ttft_s={min(ttft):.4f}", flush=True)


if __name__ == "__main__":
    a = sys.argv[1:] + [None] * 3
    main(tuple(a[0].split(",")) if a[0] else ("llama-3.2-1b",),
         tuple(int(x) for x in a[1].split(",")) if a[1] else (1000, 8000, 32000),
         a[2].split(",") if a[2] else None)
