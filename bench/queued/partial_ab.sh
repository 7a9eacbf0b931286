#!/usr/bin/env bash
# Either GPU: the attention unit's partial written by the chunk's end straight to attn_partial
# (three placements of the change, bench/queued/attention_{v1,v2,vfull}.cuh) against the old
# write through shared memory after the chunk (attention_old.cuh); trees interleaved, rounds
# told apart by a define no code reads (KOG_TREE).
# Device call: bash bench/queued/partial_ab.sh   (results under $OUT)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
D=$(date -u +%F); F=$OUT/variants-$G-$D-partial.txt; : > $F
cp kernels_src/attention.cuh /tmp/attention.cuh.work
for r in ${ROUNDS:-1 2 3}; do
  i=0
  for v in old v1 v2 vfull; do
    cp bench/queued/attention_$v.cuh kernels_src/attention.cuh
    timeout 120 python3 scripts/tune_monokernel.py ${SHAPES:-smollm2-135m,qwen2.5-0.5b,llama-3.2-1b,qwen3-1.7b} "[{\"KOG_TREE\": $i}]" 256 2>&1 | grep '^{' >> $F
    echo "round $r $v rc=$?"; i=$((i + 1))
  done
done
cp /tmp/attention.cuh.work kernels_src/attention.cuh
python3 scripts/tune_monokernel.py --summarize $F | tail -n 16
