#!/usr/bin/env bash
# Either GPU: kernels_src files of bench/queued/tree_new against tree_old (main's), GPU tests on
# the new tree first (SKIP_TESTS=1: none), then the trees interleaved (TREES, default "old new"),
# rounds told apart by a define no code reads (KOG_TREE: the tree's index in TREES); then the
# old and new trees' profiles of PROFILE (a shape).
# Device call: NAME=what bash bench/queued/tree_ab.sh   (SHAPES, ROUNDS, PROFILE as below)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
D=$(date -u +%F); F=$OUT/variants-$G-$D-$NAME${TAG:-}.txt; : > $F
cp bench/queued/tree_new/* kernels_src/
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 200 python3 -m pytest -q -m gpu -x -p no:cacheprovider tests/ > $OUT/gpu-tests-$G-$D-$NAME.txt 2>&1
  echo "pytest rc=$?"; tail -n 3 $OUT/gpu-tests-$G-$D-$NAME.txt
fi
for r in $(seq 1 ${ROUNDS:-3}); do
  i=0
  for v in ${TREES:-old new}; do
    cp bench/queued/tree_$v/* kernels_src/
    timeout 150 python3 scripts/tune_monokernel.py ${SHAPES:-smollm2-135m,qwen2.5-0.5b,llama-3.2-1b,qwen3-1.7b} "[{\"KOG_TREE\": $i}]" 256 2>&1 | grep '^{' >> $F
    echo "round $r $v rc=$?"; i=$((i + 1))
  done
done
python3 scripts/tune_monokernel.py --summarize $F | grep -A12 '^means'
if [ -n "${PROFILE:-}" ]; then
  for v in old new; do
    cp bench/queued/tree_$v/* kernels_src/
    timeout 60 python3 -m kogcupy.cli profile --shape $PROFILE --out $OUT/trace-$PROFILE-$G-$D-$NAME-$v.json.gz \
      > $OUT/profile-$PROFILE-$G-$D-$NAME-$v.txt 2>&1
    echo "profile $v rc=$?"; grep -A7 "critical path" $OUT/profile-$PROFILE-$G-$D-$NAME-$v.txt | tail -n 6
  done
fi
cp bench/queued/tree_new/* kernels_src/
