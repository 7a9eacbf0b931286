#!/usr/bin/env bash
# Either GPU (forty-fourth session): what a37fef9 (a GEMV tile's next loads issued before the
# unit's warp sum) was not measured on for want of device time -- against cd0ceb1's loop
# (dot_finish_revert.patch), three interleaved rounds on Qwen3, the 8B and the small shapes / 1B
# at position 2,000 -- then compute-sanitizer (memcheck, racecheck) and `-m multigpu` on one GPU
# on main's kernel. Device call: bash bench/queued/dot_finish_checks.sh  (results under $OUT; ~400 s)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
D=$(date -u +%F)
rm -rf bench/queued/tree_old bench/queued/tree_new; mkdir -p bench/queued/tree_old bench/queued/tree_new
cp kernels_src/gemv.cuh bench/queued/tree_new/; cp kernels_src/gemv.cuh bench/queued/tree_old/
patch -s -p2 -d bench/queued/tree_old < bench/queued/dot_finish_revert.patch \
  || git apply -p2 --directory=bench/queued/tree_old bench/queued/dot_finish_revert.patch \
  || { echo "the patch does not apply"; exit 1; }
SKIP_TESTS=1 NAME=dot-finish TAG=-b SHAPES=qwen3-1.7b,llama-3.1-8b,smollm2-135m@2000,qwen2.5-0.5b@2000,llama-3.2-1b@2000 \
  bash bench/queued/tree_ab.sh
rm -rf bench/queued/tree_old bench/queued/tree_new           # (tree_ab.sh leaves main's kernel in place)
SANITIZE_TIMEOUT=150 scripts/sanitize_kernels.sh 16 > $OUT/sanitizer-$G-$D-s44.txt 2>&1
grep -i "error summary\|racecheck summary" $OUT/sanitizer-$G-$D-s44.txt
timeout 150 python3 -m pytest -q -m multigpu -p no:cacheprovider tests/ > $OUT/multigpu-one-gpu-$G-$D-s44.txt 2>&1
echo "multigpu rc=$?"; tail -n 1 $OUT/multigpu-one-gpu-$G-$D-s44.txt
