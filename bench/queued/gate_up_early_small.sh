#!/usr/bin/env bash
# Either GPU (queued in the forty-fifth session): gate_up's tiles issued before the mid sum's
# wait on the single-block builds, 1 against their default 2, re-measured on the kernel with the
# GEMV and block-sum changes (s31 measured 1: Qwen2.5-0.5B -1.2 %, SmolLM2-135M -5.3 %). In
# Qwen2.5's s45 profile the hop into gate_up is 2.1 us against ~0.9 on the other shapes: the
# poll queues behind the 8.6 MB of tiles issued before it. Three interleaved rounds.
# Device call: bash bench/queued/gate_up_early_small.sh   (results under $OUT; ~60 s)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
F=$OUT/variants-$G-$(date -u +%F)-gate-up-early-small.txt
A='[{}, {"KOG_GATE_UP_EARLY": 1}, {}, {"KOG_GATE_UP_EARLY": 1}, {}, {"KOG_GATE_UP_EARLY": 1}]'
timeout 200 python3 scripts/tune_monokernel.py qwen2.5-0.5b,smollm2-135m,qwen2.5-0.5b@2000 "$A" 256 > $F 2>&1
echo "tune rc=$?"; python3 scripts/tune_monokernel.py --summarize $F | grep -A8 '^means'
