#!/usr/bin/env bash
# Either GPU (forty-sixth session): gate_up's early tiles re-measured on the static default with
# down's depth 8 (build_plan.py's rule: 1 on pairs up to hidden 2,048, "until the pair is
# measured again"): Qwen3 / the 1B against 2, the 8B against 1, at positions 0 and 2,000.
# Device call: bash bench/queued/gate_up_early_large.sh   (results under $OUT; ~90 s)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
F=$OUT/variants-$G-$(date -u +%F)-gate-up-early-large.txt; : > $F
A='[{}, {"KOG_GATE_UP_EARLY": 2}, {}, {"KOG_GATE_UP_EARLY": 2}, {}, {"KOG_GATE_UP_EARLY": 2}]'
timeout 200 python3 scripts/tune_monokernel.py qwen3-1.7b,llama-3.2-1b,qwen3-1.7b@2000,llama-3.2-1b@2000 "$A" 256 >> $F 2>&1
A='[{}, {"KOG_GATE_UP_EARLY": 1}, {}, {"KOG_GATE_UP_EARLY": 1}, {}, {"KOG_GATE_UP_EARLY": 1}]'
timeout 200 python3 scripts/tune_monokernel.py llama-3.1-8b,llama-3.1-8b@2000 "$A" 256 >> $F 2>&1
echo "tune rc=$?"; python3 scripts/tune_monokernel.py --summarize $F | grep -A14 '^means'
