#!/usr/bin/env bash
# Either GPU (forty-third session): every block samples the next token itself at layer 0
# (tree_new: no hop through block 0's sampler, no embedding sum) against main's block-0
# sampler (tree_old). GPU tests on the new tree first, then trees interleaved, rounds told
# apart by a define no code reads (KOG_TREE 0 old, 1 new). Device call: bash bench/queued/sample_every_block_ab.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
D=$(date -u +%F); F=$OUT/variants-$G-$D-sample-every-block${TAG:-}.txt; : > $F
cp bench/queued/tree_new/* kernels_src/
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 200 python3 -m pytest -q -m gpu -x -p no:cacheprovider tests/ > $OUT/gpu-tests-$G-$D-sample-every-block.txt 2>&1
  echo "pytest rc=$?"; tail -n 3 $OUT/gpu-tests-$G-$D-sample-every-block.txt
fi
for r in $(seq 1 ${ROUNDS:-3}); do
  i=0
  for v in old new; do
    cp bench/queued/tree_$v/* kernels_src/
    timeout 120 python3 scripts/tune_monokernel.py ${SHAPES:-smollm2-135m,qwen2.5-0.5b,llama-3.2-1b,qwen3-1.7b} "[{\"KOG_TREE\": $i}]" 256 2>&1 | grep '^{' >> $F
    echo "round $r $v rc=$?"; i=$((i + 1))
  done
done
cp bench/queued/tree_new/* kernels_src/
python3 scripts/tune_monokernel.py --summarize $F | grep -A12 '^means'
