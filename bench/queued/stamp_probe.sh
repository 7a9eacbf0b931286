#!/usr/bin/env bash
# Either GPU: where an attention unit's chunk time goes. Profiles of main, then with the chunk
# stamp (slot layer * 16 + 15) moved from the chunk's start to a later point of the
# tensor-core chunk (bench/queued/stamp_probe.py): the summary's split of the unit's work then
# reads "start .. point" and "point .. end".
# Device call: bash bench/queued/stamp_probe.sh   (results under $OUT; ~200 s)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
D=$(date -u +%F)
for variant in ${POINTS:-main tiles-start tiles-end merged}; do
  [ $variant = main ] || python3 bench/queued/stamp_probe.py $variant || exit 1
  for s in ${SHAPES:-smollm2-135m llama-3.2-1b}; do
    timeout 60 python3 -m kogcupy.cli profile --shape $s --out $OUT/trace-$s-$G-$D-$variant.json.gz > $OUT/profile-$s-$G-$D-$variant.txt 2>&1
    echo "$s $variant rc=$?: $(grep -E "attention's work" $OUT/profile-$s-$G-$D-$variant.txt)"
  done
  [ $variant = main ] || python3 bench/queued/stamp_probe.py restore
done
