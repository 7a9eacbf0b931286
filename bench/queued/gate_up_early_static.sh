#!/usr/bin/env bash
# Either GPU (forty-second session's queue item 3): gate_up's early tiles 2 against build_plan's
# 1 on the 1B / Qwen3, now that one GPU runs every unit statically with down's depth 8. On the
# H100 2 alone won +0.4 to +0.8 % against the old depth 12, but on top of depth 8 Qwen3 +0.39 %
# against +0.53 % for depth 8 alone (PERF.md, "down's depth on the static default"). Three
# interleaved rounds at positions 0 and 2,000. Device call: bash bench/queued/gate_up_early_static.sh (~60 s)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
F=$OUT/variants-$G-$(date -u +%F)-gate-up-early-static.txt
V='{}, {"KOG_GATE_UP_EARLY": 2}'
timeout 200 python3 scripts/tune_monokernel.py llama-3.2-1b,qwen3-1.7b,llama-3.2-1b@2000,qwen3-1.7b@2000 "[$V, $V, $V]" 256 > $F 2>&1
echo "tune rc=$?"; python3 scripts/tune_monokernel.py --summarize $F | grep -A12 "^means"
