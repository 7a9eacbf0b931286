#!/usr/bin/env bash
# One device call for a tuning A/B: GPU tests on the default build and on a candidate
# (KOGCUPY_TUNING=$CAND), then scripts/tune_monokernel.py on $SHAPES with $VARIANTS
# (interleaved, so that drift shows), and optionally a long-context A/B ($LONG_SHAPE).
# Logs under $OUT; the tables are printed last.
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0;; esac   # usage: the header
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
ONE='[{}]'    # (a "}" inside ${VAR:-...} would end the expansion)
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_monokernel.py 2>&1 \
      | tee "$OUT/pytest-default.txt" | tail -n 4
  if [ -n "${CAND:-}" ]; then
    KOGCUPY_TUNING="$CAND" timeout 200 python3 -m pytest -q -p no:cacheprovider \
        tests/test_gpu_monokernel.py -k "not tuning_variants" 2>&1 | tee "$OUT/pytest-cand.txt" | tail -n 4
  fi
fi
timeout ${TUNE_TIMEOUT:-300} python3 scripts/tune_monokernel.py "${SHAPES:-llama-3.2-1b,qwen3-1.7b,smollm2-135m}" \
    "${VARIANTS:-$ONE}" ${NEW:-256} 2>&1 | tee "$OUT/tune.txt" | grep -v '^{' > "$OUT/tune-table.txt"
if [ -n "${LONG_SHAPE:-}" ]; then
  timeout ${LONG_TIMEOUT:-120} python3 scripts/tune_monokernel.py "$LONG_SHAPE" "${LONG_VARIANTS:-$ONE}" ${NEW:-256} \
      2>&1 | tee "$OUT/tune-long.txt" | grep -v '^{' > "$OUT/tune-long-table.txt"
fi
echo "== tests"; tail -n 1 "$OUT"/pytest-*.txt 2>/dev/null
echo "== tune"; cat "$OUT/tune-table.txt"
[ -f "$OUT/tune-long-table.txt" ] && { echo "== long"; cat "$OUT/tune-long-table.txt"; }
exit 0
