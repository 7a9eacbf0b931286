#!/usr/bin/env bash
# Session 42: gate_up's units all static, the LM head's dynamic tail kept (KOG_GU_STATIC 1),
# against main and against both tails off; the GPU test of the same bits with it.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"; date -u
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
D=$(date -u +%F); T=$OUT/gpu-tests-$G-$D-gu-static.txt
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_monokernel.py -k "dynamic_tail_same_bits or ffn_dynamic_tail" > $T 2>&1; echo "test rc=$?"; tail -n 2 $T
F=$OUT/variants-$G-$D-gu-static.txt
A='[{}, {"KOG_GU_STATIC": 1}, {"KOG_DYN_PERMILLE": 0}, {}, {"KOG_GU_STATIC": 1}, {"KOG_DYN_PERMILLE": 0}, {}, {"KOG_GU_STATIC": 1}, {"KOG_DYN_PERMILLE": 0}]'
timeout 250 python3 scripts/tune_monokernel.py llama-3.2-1b,qwen3-1.7b,llama-3.1-8b "$A" 256 > $F 2>&1; echo "tune rc=$?"
A='[{}, {"KOG_GU_STATIC": 1}, {}, {"KOG_GU_STATIC": 1}, {}, {"KOG_GU_STATIC": 1}]'
timeout 150 python3 scripts/tune_monokernel.py llama-3.2-1b@2000,qwen3-1.7b@2000 "$A" 256 >> $F 2>&1; echo "tune rc=$?"
python3 scripts/tune_monokernel.py --summarize $F | tail -n 12; date -u
