#!/usr/bin/env bash
# H200 only (bench/NOTES.md, thirty-seventh session): o_proj's tiles on the blocks that ran an
# attention unit issued after the wait for their group's partials (KOG_OPROJ_UNIT_EARLY 0 / 1 of
# the two), from bench/queued/oproj_unit_early.patch; lost on an H100 (PERF.md), not measured on
# an H200. Also KOG_QKV_EARLY at position 2,000 on the H200 (kept there from position-0 rounds),
# and scripts/burst_probe.py re-run after its review fixes (d6636f5; PERF.md).
# Device call: bash bench/queued/oproj_unit_early_h200.sh  (results under $OUT; ~160 s; exits at once on an H100)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) ;; *) echo "not an H200: nothing run"; exit 0;; esac
D=$(date -u +%F)
A='[{}, {"KOG_QKV_EARLY": 2}, {}, {"KOG_QKV_EARLY": 2}, {}, {"KOG_QKV_EARLY": 2}]'
timeout 120 python3 scripts/tune_monokernel.py qwen3-1.7b@2000,llama-3.2-1b@2000 "$A" 256 > $OUT/variants-h200-$D-qkv-early-2000.txt 2>&1
echo "tune rc=$?"
git apply bench/queued/oproj_unit_early.patch || { echo "the patch does not apply"; exit 1; }
A='[{}, {"KOG_OPROJ_UNIT_EARLY": 1}, {"KOG_OPROJ_UNIT_EARLY": 0}, {}, {"KOG_OPROJ_UNIT_EARLY": 1}, {"KOG_OPROJ_UNIT_EARLY": 0}, {}, {"KOG_OPROJ_UNIT_EARLY": 1}, {"KOG_OPROJ_UNIT_EARLY": 0}]'
timeout 220 python3 scripts/tune_monokernel.py qwen3-1.7b,llama-3.2-1b,llama-3.1-8b,qwen3-1.7b@2000 "$A" 256 > $OUT/variants-h200-$D-oproj-unit-early.txt 2>&1
echo "tune rc=$?"
git apply -R bench/queued/oproj_unit_early.patch
grep -v '^{' $OUT/variants-h200-$D-qkv-early-2000.txt | tail -n 14
grep -v '^{' $OUT/variants-h200-$D-oproj-unit-early.txt | tail -n 38
timeout 60 python3 scripts/burst_probe.py > $OUT/burst-probe-h200-$D.txt 2>&1
timeout 40 python3 scripts/burst_probe.py idle >> $OUT/burst-probe-h200-$D.txt 2>&1
cat $OUT/burst-probe-h200-$D.txt
