#!/usr/bin/env bash
# KOG_GRAB_AHEAD (gemv.cuh: the dynamic tail's grabs issued ahead, its tiles in one stream with
# the static ones) and KOG_QKV_STAGE (attn_norm_qkv's rows staged in shared memory before its
# wait). GPU tests with both forced, interleaved rounds against the default, the small shapes
# with a tail forced, Qwen3 profiles. Either GPU (results named by it).
# Device call: bash bench/queued/grab_ahead.sh   (results under $OUT; ~400 s)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
D=$(date -u +%F); V=$OUT/variants-$G-$D-grab-stage.txt
KOGCUPY_TUNING='{"KOG_GRAB_AHEAD": 1, "KOG_QKV_STAGE": 1}' timeout 100 python3 -m pytest -q -m gpu tests/test_gpu_monokernel.py \
  -k "dynamic_tail or greedy_tokens or logits_match" > $OUT/grab-stage-tests-$G-$D.txt 2>&1
tail -n 3 $OUT/grab-stage-tests-$G-$D.txt
g='{"KOG_GRAB_AHEAD": 1}'; s='{"KOG_QKV_STAGE": 1}'; gs='{"KOG_GRAB_AHEAD": 1, "KOG_QKV_STAGE": 1}'
timeout 220 python3 scripts/tune_monokernel.py qwen3-1.7b,llama-3.2-1b "[{}, $g, $s, $gs, {}, $g, $s, $gs, {}, $g, $s, $gs]" 256 > $V 2>&1
echo "tune rc=$?"
for sh in qwen3-1.7b; do
  for t in "$g" "$s"; do n=$(echo "$t" | tr -dc 'A-Z_' | sed 's/KOG_//'); KOGCUPY_TUNING="$t" timeout 60 python3 -m kogcupy.cli profile --shape $sh \
    --out $OUT/trace-$sh-$n-$G-$D.json > $OUT/profile-$sh-$n-$G-$D.txt 2>&1; gzip -f $OUT/trace-$sh-$n-$G-$D.json; tail -n 6 $OUT/profile-$sh-$n-$G-$D.txt; done; done
timeout 90 python3 scripts/tune_monokernel.py llama-3.1-8b "[{}, $g, {}, $g, {}, $g]" 256 >> $V 2>&1
echo "tune rc=$?"
d='{"KOG_DYN_PERMILLE": 100}'; dg='{"KOG_DYN_PERMILLE": 100, "KOG_GRAB_AHEAD": 1}'
timeout 120 python3 scripts/tune_monokernel.py smollm2-135m,qwen2.5-0.5b "[{}, $s, $d, $dg, {}, $s, $d, $dg]" 256 >> $V 2>&1
echo "tune rc=$?"
grep -v '^{' $V | tail -n 40
KOGCUPY_TUNING='{"KOG_GRAB_AHEAD": 1, "KOG_QKV_STAGE": 1}' timeout 200 python3 -m pytest -q -m gpu tests \
  > $OUT/grab-stage-gpu-suite-$G-$D.txt 2>&1
tail -n 3 $OUT/grab-stage-gpu-suite-$G-$D.txt
