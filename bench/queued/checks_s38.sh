#!/usr/bin/env bash
# Queued by the thirty-eighth session (no device time left after the grabs-ahead rounds): the
# checks of main's dynamic tail in its final form (the grabs asked one grab ahead, gemv.cuh),
# which ran on a GPU only as the knob KOG_GRAB_AHEAD (forced over the suite): pytest -m gpu,
# compute-sanitizer memcheck / racecheck with a 300-permille tail forced (the sanitizer's tiny
# model runs static otherwise), then the bench (on an H200: the README's table).
# Device call: bash bench/queued/checks_s38.sh   (results under $OUT; ~350 s on an H200)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
D=$(date -u +%F); H=$(git rev-parse --short HEAD); C=$OUT/gpu-checks-$G-$D-grab-ahead.txt
echo "# pytest -m gpu and compute-sanitizer (a 300-permille dynamic tail forced), $GPU, main $H" > $C
timeout 200 python3 -m pytest -q -m gpu tests >> $C 2>&1
tail -n 2 $C
KOGCUPY_TUNING='{"KOG_DYN_PERMILLE": 300}' SANITIZE_TIMEOUT=90 timeout 190 bash scripts/sanitize_kernels.sh >> $C 2>&1
grep -E "SUMMARY|plan|greedy" $C
export KOGCUPY_BENCH_COMMIT=$H
timeout 200 python3 scripts/bench.py --shapes llama-3.2-1b,qwen3-1.7b,llama-3.1-8b,smollm2-135m,qwen2.5-0.5b \
  --engines torch-sdpa-graph,kogcupy --new-tokens 256 --positions 0,2000 --ttft-prompts 1000 --agent-turns 2 \
  --sampling '' --graph-repeats 1 --out $OUT > $OUT/bench-$G-$D.log 2>&1
echo "bench rc=$?"; tail -n 14 $OUT/bench-$G-$D.log
