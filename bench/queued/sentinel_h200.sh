#!/usr/bin/env bash
# H200 only (bench/NOTES.md, thirty-sixth session): the residual sums' sentinel poll and the in-sum
# copies, chosen on H100s and never flipped on an H200; then a Qwen3 profile with the sentinel off.
# Device call: bash bench/queued/sentinel_h200.sh  (results under $OUT; ~80 s; exits at once on an H100)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) ;; *) echo "not an H200: nothing run"; exit 0;; esac
A='[{}, {"KOG_POLL_SENTINEL": 0}, {"KOG_IN_COPIES": 1}, {"KOG_IN_COPIES": 2}, {}, {"KOG_POLL_SENTINEL": 0}, {"KOG_IN_COPIES": 1}, {"KOG_IN_COPIES": 2}, {}, {"KOG_POLL_SENTINEL": 0}]'
timeout 240 python3 scripts/tune_monokernel.py qwen3-1.7b,llama-3.2-1b,llama-3.1-8b,smollm2-135m,qwen2.5-0.5b "$A" 256 > $OUT/variants-h200-2026-12-06-s36-sentinel.txt 2>&1
echo "tune rc=$?"
KOGCUPY_TUNING='{"KOG_POLL_SENTINEL": 0}' timeout 60 python3 -m kogcupy.cli profile --shape qwen3-1.7b --out $OUT/trace-qwen3-1.7b-sentinel0-h200-2026-12-06-s36.json > $OUT/profile-sentinel0.txt 2>&1
echo "profile rc=$?"; gzip -9 $OUT/*.json
grep -A6 "^stage  *first" $OUT/profile-sentinel0.txt | head -7
grep -v '^{' $OUT/variants-h200-2026-12-06-s36-sentinel.txt | tail -n 52
