#!/usr/bin/env bash
# Session 42: the FFN knobs whose rules were set with a dynamic tail, re-checked on one GPU's
# static default (two interleaved rounds): gate_up's early tiles, down's depth.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"; date -u
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
F=$OUT/variants-$G-$(date -u +%F)-static-knobs.txt
V='{}, {"KOG_GATE_UP_EARLY": 2}, {"KOG_GATE_UP_EARLY": 1}, {"KOG_DOWN_DEPTH": 8}, {"KOG_DOWN_DEPTH": 12}, {"KOG_DOWN_DEPTH": 16}'
timeout 280 python3 scripts/tune_monokernel.py llama-3.2-1b,qwen3-1.7b,llama-3.1-8b "[$V, $V]" 256 > $F 2>&1; echo "tune rc=$?"
python3 scripts/tune_monokernel.py --summarize $F | grep -A40 "^means" ; date -u
