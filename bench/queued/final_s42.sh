#!/usr/bin/env bash
# Session 42's last call: the shipped tree's GPU tests, racecheck, and bench (on an H200 the
# queued H200 bench with its A/B instead of the bench).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"; date -u
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
D=$(date -u +%F)
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $OUT/pytest-gpu-$G-$D-final.txt 2>&1; echo "pytest rc=$?"; tail -n 2 $OUT/pytest-gpu-$G-$D-final.txt
if [ "$G" = h200 ]; then bash bench/queued/h200_bench.sh; exit 0; fi
C=$OUT/gpu-checks-$G-$D-final.txt
S=$SECONDS; timeout 110 compute-sanitizer --tool racecheck --target-processes all python3 scripts/sanitize_kernels.py 16 2 80 > $C 2>&1
echo "racecheck rc=$? in $((SECONDS - S)) s" >> $C; grep -E "plan|SUMMARY|rc=" $C
timeout 280 python3 scripts/bench.py --shapes llama-3.2-1b,qwen3-1.7b,llama-3.1-8b,smollm2-135m,qwen2.5-0.5b \
  --engines torch-sdpa-graph,kogcupy --new-tokens 256 --positions 0,2000 --ttft-prompts 1000 --agent-turns 2 \
  --sampling '' --graph-repeats 1 --out $OUT > $OUT/bench-$G-$D.log 2>&1
echo "bench rc=$?"; grep -A20 "^engine" $OUT/bench-$G-$D.log | head -22; date -u
