#!/usr/bin/env bash
# Queued by the thirty-eighth session: the dynamic tail's share re-measured now that a grab no
# longer drains a warp's stream (gemv.cuh; PERF.md "The dynamic tail's grabs asked one grab
# ahead"). KOG_DYN_PERMILLE 100 is main's (chosen while each grab cost two round trips);
# predicted: a larger share (150-200) evens the multiprocessors for less now, Qwen3 / 1B 0 to
# +1 %, the 8B 0 to +0.5 %; 50 a loss. Either GPU (results named by it).
# Device call: bash bench/queued/dyn_share_s38.sh   (results under $OUT; ~150 s)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
D=$(date -u +%F); V=$OUT/variants-$G-$D-dyn-share.txt
R='{}, {"KOG_DYN_PERMILLE": 50}, {"KOG_DYN_PERMILLE": 150}, {"KOG_DYN_PERMILLE": 200}'
timeout 240 python3 scripts/tune_monokernel.py qwen3-1.7b,llama-3.2-1b,llama-3.1-8b "[$R, $R, $R]" 256 > $V 2>&1
echo "tune rc=$?"; grep -v '^{' $V | tail -n 40
