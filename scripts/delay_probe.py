"""Which stages' latency the decode step waits on: a delay probe (one device call).

    python scripts/delay_probe.py smollm2-135m,llama-3.2-1b [--ns 1000] [--new 256]

For each shape, builds in which every thread spins --ns nanoseconds at one stage's
inputs-ready point (kog_prof slot layer * 16 + k: KOG_DELAY_SLOT, sync.cuh), in every layer and
step, one stage per build, and measures decode against the undelayed build (run first and last).
A stage whose delay reaches the step in full (1.0 of each added nanosecond a layer) is on the
critical path everywhere; less means the others wait for something else part of the time, so
shortening that stage buys only that share. Random bf16 weights, greedy, 32 prompt tokens.
"""
from __future__ import annotations

import argparse
import json
import sys

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from kogcupy.gpu.profile import stage_slots  # noqa: E402

# stage -> its inputs-ready slot within a layer's 16: its first slot + 1 (profile.py's slot map)
STAGE_SLOTS = {name: first + 1 for name, layer, first in stage_slots(1) if layer == 0}


def sensitivities(base_steps_us: list[float], delayed_us: dict[str, float], n_layers: int,
                  delay_ns: int) -> dict[str, float]:
    """Share of each stage's added delay (delay_ns a layer) that reached the step, against the
    mean of the undelayed runs."""
    base = sum(base_steps_us) / len(base_steps_us)
    return {k: (v - base) * 1e3 / (n_layers * delay_ns) for k, v in delayed_us.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("shapes", help="comma-separated random-weight shapes (kogcupy.model.random_weights)")
    ap.add_argument("--ns", type=int, default=1000, help="delay a layer at the probed stage")
    ap.add_argument("--new", type=int, default=256, help="tokens decoded per run")
    args = ap.parse_args(argv)
    if args.ns <= 0:
        ap.error(f"--ns must be > 0, got {args.ns}")

    from kogcupy.gpu.device_weights import DeviceModel
    from kogcupy.gpu.measure import bench_decode
    from kogcupy.model.random_weights import shape_config

    print(f"{'shape':16s} {'base us':>8s} " + " ".join(f"{k:>9s}" for k in STAGE_SLOTS)
          + "   (share of the delay that reached the step)")
    for name in args.shapes.split(","):
        cfg = shape_config(name)
        ctx = max(1024, 32 + args.new + 16)
        dev = DeviceModel.random(cfg, rope_positions=ctx)
        runs = [{}] + [{"KOG_DELAY_SLOT": s, "KOG_DELAY_NS": args.ns} for s in STAGE_SLOTS.values()] + [{}]
        steps = [bench_decode(cfg, prompt_len=32, new_tokens=args.new, device_model=dev, tuning=tuning,
                              context_length=ctx)["step_us"] for tuning in runs]
        del dev                         # (the next shape's weights go where these were)
        base = [steps[0], steps[-1]]
        delayed = dict(zip(STAGE_SLOTS, steps[1:-1]))
        sens = sensitivities(base, delayed, cfg.n_layers, args.ns)
        print(f"{name:16s} {sum(base) / 2:8.1f} " + " ".join(f"{sens[k]:9.2f}" for k in STAGE_SLOTS),
              flush=True)
        print(json.dumps({"shape": name, "base_step_us": base, "delayed_step_us": delayed,
                          "delay_ns": args.ns, "layers": cfg.n_layers, "share": sens}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
