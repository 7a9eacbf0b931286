#!/usr/bin/env bash
# KOG_GRAB_AHEAD (gemv.cuh): the dynamic tail's grabs issued ahead, its tiles in one stream with
# the static ones. GPU tests with it forced, interleaved rounds against the default, the small
# shapes with a tail forced, one Qwen3 profile with it. Either GPU (results named by it).
# Device call: bash bench/queued/grab_ahead.sh   (results under $OUT; ~300 s)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
D=$(date -u +%F)
KOGCUPY_TUNING='{"KOG_GRAB_AHEAD": 1}' timeout 200 python3 -m pytest -q -m gpu tests/test_gpu_monokernel.py \
  -k "dynamic_tail or tuning_variants or greedy_tokens or down_first or logits_match" > $OUT/grab-ahead-tests-$G-$D.txt 2>&1
tail -n 3 $OUT/grab-ahead-tests-$G-$D.txt
A='[{}, {"KOG_GRAB_AHEAD": 1}, {}, {"KOG_GRAB_AHEAD": 1}, {}, {"KOG_GRAB_AHEAD": 1}]'
timeout 200 python3 scripts/tune_monokernel.py qwen3-1.7b,llama-3.2-1b,llama-3.1-8b "$A" 256 > $OUT/variants-$G-$D-grab-ahead.txt 2>&1
echo "tune rc=$?"
B='[{}, {"KOG_DYN_PERMILLE": 100}, {"KOG_DYN_PERMILLE": 100, "KOG_GRAB_AHEAD": 1}, {}, {"KOG_DYN_PERMILLE": 100}, {"KOG_DYN_PERMILLE": 100, "KOG_GRAB_AHEAD": 1}]'
timeout 120 python3 scripts/tune_monokernel.py smollm2-135m,qwen2.5-0.5b "$B" 256 >> $OUT/variants-$G-$D-grab-ahead.txt 2>&1
echo "tune rc=$?"
KOGCUPY_TUNING='{"KOG_GRAB_AHEAD": 1}' timeout 90 python3 -m kogcupy.cli profile --shape qwen3-1.7b \
  --out $OUT/trace-qwen3-1.7b-grab-ahead-$G-$D.json > $OUT/profile-grab-ahead-$G-$D.txt 2>&1
gzip -f $OUT/trace-qwen3-1.7b-grab-ahead-$G-$D.json
tail -n 6 $OUT/profile-grab-ahead-$G-$D.txt
grep -v '^{' $OUT/variants-$G-$D-grab-ahead.txt | tail -n 30
