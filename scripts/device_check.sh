#!/usr/bin/env bash
# One device call: GPU tests, decode speed on the three benchmark shapes, compute-sanitizer.
# Logs under $OUT (or ./device_out); a short table is printed last.
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0;; esac   # usage: the header
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_monokernel.py \
      ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.txt" | tail -n 25
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout ${BENCH_TIMEOUT:-240} python3 - <<'PY' 2>&1 | tee "$OUT/bench.txt"
import json, os
from kogcupy.gpu.measure import bench_decode
from kogcupy.model.random_weights import shape_config
rows = []
for name in os.environ.get("SHAPES", "llama-3.2-1b,qwen3-1.7b,smollm2-135m").split(","):
    r = bench_decode(shape_config(name), prompt_len=32, new_tokens=int(os.environ.get("NEW", "256")))
    r["shape"] = name
    rows.append(r)
    print(json.dumps(r), flush=True)
print("shape            tok/s    step_us   GB/s   %%readBW  (read BW %.0f GB/s)" % (rows[0]["read_bandwidth_Bps"] / 1e9))
for r in rows:
    print("%-15s %7.1f %9.1f %7.0f %7.1f%%" % (r["shape"], r["tokens_per_s"], r["step_us"],
          r["achieved_Bps"] / 1e9, r["pct_of_read_bw"]))
PY
fi
if [ "${SANITIZE:-0}" = 1 ]; then
  scripts/sanitize_kernels.sh 16 2>&1 | tee "$OUT/sanitizer.txt"
fi
