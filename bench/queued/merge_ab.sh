#!/usr/bin/env bash
# Either GPU: the attention unit's merge over only the groups its chunk fills (main) against
# all of a tile's groups (KOG_ATTN_MERGE_ALL 1, from bench/queued/merge_all.patch).
# Device call: bash bench/queued/merge_ab.sh   (results under $OUT; ~200 s)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
D=$(date -u +%F)
git apply bench/queued/merge_all.patch || { echo "the patch does not apply"; exit 1; }
A='[{}, {"KOG_ATTN_MERGE_ALL": 1}, {}, {"KOG_ATTN_MERGE_ALL": 1}, {}, {"KOG_ATTN_MERGE_ALL": 1}]'
timeout ${MERGE_TIMEOUT:-230} python3 scripts/tune_monokernel.py smollm2-135m,qwen2.5-0.5b,llama-3.2-1b,qwen3-1.7b "$A" 256 > $OUT/variants-$G-$D-merge-n.txt 2>&1
echo "tune rc=$?"
git apply -R bench/queued/merge_all.patch
grep -v '^{' $OUT/variants-$G-$D-merge-n.txt | tail -n 20
