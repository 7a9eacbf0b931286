"""x per memory domain on vs off (issue 13): the same random weights, two backends, interleaved
rounds of bench_decode.  python scripts/ab_domain_copies.py llama-3.2-1b,qwen3-1.7b,smollm2-135m 3"""
import json, sys
from kogcupy.gpu.device_weights import DeviceModel
from kogcupy.gpu.measure import bench_decode
from kogcupy.gpu.monokernel import MonokernelBackend
from kogcupy.model.random_weights import shape_config

rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
table = {}
for name in sys.argv[1].split(","):
    cfg = shape_config(name)
    ctx = 32 + 256 + 16
    dev = DeviceModel.random(cfg, "bfloat16", 0, rope_positions=ctx)
    bes = {"off": MonokernelBackend(device_model=dev, context_length=ctx, domain_copies=False),
           "on": MonokernelBackend(device_model=dev, context_length=ctx, domain_copies=True)}
    print(name, "x_copies", {k: b.x_copies for k, b in bes.items()}, flush=True)
    for r in range(rounds):
        for k in ("off", "on") if r % 2 == 0 else ("on", "off"):
            res = bench_decode(cfg, prompt_len=32, new_tokens=256, backend=bes[k])
            table.setdefault(name, {}).setdefault(k, []).append(res["tokens_per_s"])
            print(json.dumps(dict(shape=name, copies=k, round=r, **res)), flush=True)
    del bes, dev
print("shape            copies  rounds (tok/s)                 mean    change")
for name, d in table.items():
    off = sum(d["off"]) / len(d["off"])
    for k in ("off", "on"):
        m = sum(d[k]) / len(d[k])
        print(f"{name:15s}  {k:4s}  " + " / ".join(f"{v:7.1f}" for v in d[k])
              + f"   {m:7.1f}  {100 * (m / off - 1):+5.1f}%")
