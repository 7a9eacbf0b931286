#!/usr/bin/env bash
# Either GPU (on an H200 the queued H200 bench runs first): q's mma fragments written by the
# last warps right after the norm / RoPE (bench/queued/attention_vq.cuh, the working tree)
# against the chunk computing them after its first barrier (attention_old.cuh); trees
# interleaved, rounds told apart by a define no code reads (KOG_TREE); then the GPU tests.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) G=h200; cp bench/queued/attention_old.cuh kernels_src/attention.cuh; bash bench/queued/h200_bench.sh;; *) G=h100;; esac
D=$(date -u +%F); F=$OUT/variants-$G-$D-qfrag.txt; : > $F
for r in 1 2 3; do
  i=0
  for v in old vq; do
    cp bench/queued/attention_$v.cuh kernels_src/attention.cuh
    timeout 100 python3 scripts/tune_monokernel.py smollm2-135m,qwen2.5-0.5b,llama-3.2-1b,qwen3-1.7b "[{\"KOG_TREE\": $i}]" 256 2>&1 | grep '^{' >> $F
    echo "round $r $v rc=$?"; i=$((i + 1))
  done
done
python3 scripts/tune_monokernel.py --summarize $F | tail -n 8
cp bench/queued/attention_vq.cuh kernels_src/attention.cuh
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $OUT/pytest-gpu-$G-$D-vq.txt 2>&1; echo "pytest rc=$?"; tail -n 3 $OUT/pytest-gpu-$G-$D-vq.txt
