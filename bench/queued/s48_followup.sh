#!/usr/bin/env bash
# Either GPU, warm after device_serve.sh (forty-eighth session): the warm-up in two fresh
# processes (the second finds CuPy's on-disk cache), the 8B in the static-placement A/B
# (one GPU's static units against a 50-permille tail, three interleaved rounds), and a
# Qwen2.5-0.5B profile (none committed since the H100 sessions).
# Device call: bash bench/queued/s48_followup.sh   (results under $OUT; ~200 s)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
D=$(date -u +%F)
for i in 1 2; do timeout 120 python3 bench/queued/warm_up_twice.py qwen3-1.7b; done > $OUT/warm-up-twice-$G-$D.txt 2>&1
cat $OUT/warm-up-twice-$G-$D.txt | grep -v Warning
timeout 150 python3 -m kogcupy.cli profile --shape qwen2.5-0.5b --out $OUT/trace-qwen2.5-0.5b-$G-$D-s48.json.gz \
  > $OUT/profile-qwen2.5-0.5b-$G-$D-s48.txt 2>&1; echo "profile rc=$?"
F=$OUT/variants-$G-$D-static-8b.txt
timeout 280 python3 scripts/tune_monokernel.py llama-3.1-8b \
  '[{}, {"KOG_DYN_PERMILLE": 50}, {}, {"KOG_DYN_PERMILLE": 50}, {}, {"KOG_DYN_PERMILLE": 50}]' 256 > $F 2>&1
echo "8B A/B rc=$?"; python3 scripts/tune_monokernel.py --summarize $F | grep -A6 '^means'
head -24 $OUT/profile-qwen2.5-0.5b-$G-$D-s48.txt
