#!/usr/bin/env bash
# H200 only (bench/NOTES.md, thirty-sixth session): the residual sums' sentinel poll off (chosen
# on H100s, never flipped on an H200) and the in-sum copies flipped (last measured on an H200 on
# 2026-12-05, small shapes only), then Qwen3 profiles with the sentinel on (the default) and off
# in the same call. The copies get two rounds: on each shape one of {"KOG_IN_COPIES": 1} / 2 is
# the default build.
# Device call: bash bench/queued/sentinel_h200.sh  (results under $OUT; ~90 s; exits at once on an H100)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) ;; *) echo "not an H200: nothing run"; exit 0;; esac
D=$(date -u +%F)
A='[{}, {"KOG_POLL_SENTINEL": 0}, {"KOG_IN_COPIES": 1}, {"KOG_IN_COPIES": 2}, {}, {"KOG_POLL_SENTINEL": 0}, {"KOG_IN_COPIES": 1}, {"KOG_IN_COPIES": 2}, {}, {"KOG_POLL_SENTINEL": 0}]'
timeout 240 python3 scripts/tune_monokernel.py qwen3-1.7b,llama-3.2-1b,llama-3.1-8b,smollm2-135m,qwen2.5-0.5b "$A" 256 > $OUT/variants-h200-$D-sentinel.txt 2>&1
echo "tune rc=$?"
for s in 1 0; do
  KOGCUPY_TUNING="{\"KOG_POLL_SENTINEL\": $s}" timeout 60 python3 -m kogcupy.cli profile --shape qwen3-1.7b \
      --out $OUT/trace-qwen3-1.7b-sentinel$s-h200-$D.json > $OUT/profile-sentinel$s.txt 2>&1
  echo "profile sentinel $s rc=$?"; grep -A6 "^stage  *first" $OUT/profile-sentinel$s.txt | head -7
done
gzip -9 $OUT/*.json
grep -v '^{' $OUT/variants-h200-$D-sentinel.txt | tail -n 52
