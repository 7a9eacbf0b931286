#!/usr/bin/env bash
# Either GPU (queued in the forty-fifth session): the warp count and the block-stride loops of
# kog_gemv, down_residual's adds into the in sum and attn_norm_qkv's adds into the mid sum from
# KOG_THREADS instead of blockDim.x (nwarps_const.patch: compile-time strides; kog_gemv's
# per-warp unit count then divides by a constant before its first tile). The same kind of
# change as the block sum's compile-time count (fe68093: SmolLM2 +3.1 %). Spills with the patch:
# SmolLM2, Qwen2.5, Qwen3, the 8B 0 bytes, the 1B 4 (main: 0 / 0 / 4 / 4 / 4). The same change in
# attention.cuh spills 8-40 bytes more on every shape and is left out.
# Device call: bash bench/queued/nwarps_const.sh   (results under $OUT; ~250 s)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
rm -rf bench/queued/tree_old bench/queued/tree_new; mkdir -p bench/queued/tree_old bench/queued/tree_new
for f in gemv.cuh down.cuh norm_rope.cuh; do cp kernels_src/$f bench/queued/tree_old/; cp kernels_src/$f bench/queued/tree_new/; done
git apply --directory=bench/queued/tree_new -p2 bench/queued/nwarps_const.patch || { echo "the patch does not apply"; exit 1; }
NAME=nwarps-const SHAPES=smollm2-135m,qwen2.5-0.5b,llama-3.2-1b,qwen3-1.7b bash bench/queued/tree_ab.sh
SANITIZE_TIMEOUT=150 scripts/sanitize_kernels.sh 16 > $OUT/sanitizer-nwarps-const.txt 2>&1   # (tree_ab leaves the new tree in kernels_src)
grep -i "error summary\|racecheck summary" $OUT/sanitizer-nwarps-const.txt
cp bench/queued/tree_old/* kernels_src/; rm -rf bench/queued/tree_old bench/queued/tree_new
