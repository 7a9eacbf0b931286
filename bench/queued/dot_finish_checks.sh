#!/usr/bin/env bash
# Either GPU (forty-fourth session): what a37fef9 (a GEMV tile's next loads issued before the
# unit's warp sum) was not measured on for want of device time -- against cd0ceb1's loop
# (dot_finish_revert.patch), three interleaved rounds on Qwen3, the 8B and the small shapes / 1B
# at position 2,000 -- then compute-sanitizer (memcheck, racecheck) and `-m multigpu` on one GPU
# on main's kernel; and a probe of SmolLM2's -0.4 % from cd0ceb1 (mixed_rows_chain.patch).
# Device call: bash bench/queued/dot_finish_checks.sh  (results under $OUT; ~460 s)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
D=$(date -u +%F)
MAIN=$(mktemp); cp kernels_src/gemv.cuh "$MAIN"                   # main's loop
# trees SIDE PATCH: tree_old and tree_new are main's gemv.cuh, PATCH applied to tree_SIDE
trees() {
  rm -rf bench/queued/tree_old bench/queued/tree_new; mkdir -p bench/queued/tree_old bench/queued/tree_new
  cp "$MAIN" bench/queued/tree_old/gemv.cuh; cp "$MAIN" bench/queued/tree_new/gemv.cuh
  patch -s -p2 -d bench/queued/tree_$1 < "$2" || git apply -p2 --directory=bench/queued/tree_$1 "$2" \
    || { echo "$2 does not apply"; exit 1; }
}
trees old bench/queued/dot_finish_revert.patch
SKIP_TESTS=1 NAME=dot-finish TAG=-b SHAPES=qwen3-1.7b,llama-3.1-8b,smollm2-135m@2000,qwen2.5-0.5b@2000,llama-3.2-1b@2000 \
  bash bench/queued/tree_ab.sh
# the mixed-row gate/up tiles (SmolLM2, Qwen2.5) with the one-chain products again
# (mixed_rows_chain.patch, a probe: no tests) against main, three rounds
trees new bench/queued/mixed_rows_chain.patch
SKIP_TESTS=1 NAME=mixed-rows-chain SHAPES=smollm2-135m,qwen2.5-0.5b,smollm2-135m@2000 bash bench/queued/tree_ab.sh
cp "$MAIN" kernels_src/gemv.cuh                                    # main's kernel again
rm -rf bench/queued/tree_old bench/queued/tree_new
SANITIZE_TIMEOUT=150 scripts/sanitize_kernels.sh 16 > $OUT/sanitizer-$G-$D-s45.txt 2>&1
grep -i "error summary\|racecheck summary" $OUT/sanitizer-$G-$D-s45.txt
timeout 150 python3 -m pytest -q -m multigpu -p no:cacheprovider tests/ > $OUT/multigpu-one-gpu-$G-$D-s45.txt 2>&1
echo "multigpu rc=$?"; tail -n 1 $OUT/multigpu-one-gpu-$G-$D-s45.txt
