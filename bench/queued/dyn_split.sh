#!/usr/bin/env bash
# The queued KOG_DYN_SPLIT experiment (bench/NOTES.md, thirty-fifth session): applies
# bench/queued/dyn_split.patch to the device's copy, runs the dynamic-tail GPU tests with 16
# pools forced, then interleaved rounds (scripts/tune_monokernel.py), and reverts the patch.
# Device call: bash bench/queued/dyn_split.sh  (results under $OUT; ~150 s on an H100)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "GPU: $GPU" | tee $OUT/gpu.txt
git apply bench/queued/dyn_split.patch && echo "patch applied" || { echo "patch failed"; exit 1; }
KOGCUPY_TUNING='{"KOG_DYN_SPLIT": 16}' timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_monokernel.py \
  -k "dynamic_tail or greedy_tokens_identical" > $OUT/pytest-split16.txt 2>&1
echo "pytest split16 rc=$?"; tail -n 3 $OUT/pytest-split16.txt
A='[{}, {"KOG_DYN_SPLIT": 16}, {}, {"KOG_DYN_SPLIT": 16}, {}, {"KOG_DYN_SPLIT": 16}]'
timeout 200 python3 scripts/tune_monokernel.py qwen3-1.7b,llama-3.2-1b,llama-3.1-8b "$A" 256 > $OUT/variants-split-large.txt 2>&1
echo "tune large rc=$?"; grep -v '^{' $OUT/variants-split-large.txt | tail -n 20
B='[{}, {"KOG_DYN_PERMILLE": 100}, {"KOG_DYN_PERMILLE": 100, "KOG_DYN_SPLIT": 16}, {}, {"KOG_DYN_PERMILLE": 100}, {"KOG_DYN_PERMILLE": 100, "KOG_DYN_SPLIT": 16}]'
timeout 150 python3 scripts/tune_monokernel.py smollm2-135m,qwen2.5-0.5b "$B" 256 > $OUT/variants-split-small.txt 2>&1
echo "tune small rc=$?"; grep -v '^{' $OUT/variants-split-small.txt | tail -n 14
git apply -R bench/queued/dyn_split.patch && echo "patch reverted"
