#!/usr/bin/env bash
# Session 42: one GPU's default build now places every FFN / LM head unit statically. The GPU
# test of the default build's same bits, then the same test with a 50-permille tail forced
# (main's old default: predicted to fail), the GPU tests, then the bench of this tree (on an
# H200 with an A/B of the tail against static first).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"; date -u
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
D=$(date -u +%F); T=$OUT/gpu-tests-$G-$D-static-default.txt
echo "# default build" > $T
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_monokernel.py -k default_build_same_bits >> $T 2>&1; echo "default rc=$?" | tee -a $T
echo "# KOGCUPY_TUNING='{\"KOG_DYN_PERMILLE\": 50}'" >> $T
KOGCUPY_TUNING='{"KOG_DYN_PERMILLE": 50}' timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_monokernel.py -k default_build_same_bits >> $T 2>&1; echo "tail forced rc=$?" | tee -a $T
grep -E "passed|failed|Mismatched" $T
if [ "$G" = h200 ]; then
  A='[{}, {"KOG_DYN_PERMILLE": 50}, {}, {"KOG_DYN_PERMILLE": 50}, {}, {"KOG_DYN_PERMILLE": 50}]'
  timeout 150 python3 scripts/tune_monokernel.py llama-3.2-1b,qwen3-1.7b,llama-3.1-8b "$A" 256 > $OUT/variants-$G-$D-static-default.txt 2>&1
  python3 scripts/tune_monokernel.py --summarize $OUT/variants-$G-$D-static-default.txt | tail -n 6
else
  timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $OUT/pytest-gpu-$G-$D-static-default.txt 2>&1; echo "pytest rc=$?"; tail -n 3 $OUT/pytest-gpu-$G-$D-static-default.txt
fi
export KOGCUPY_BENCH_COMMIT=${KOGCUPY_BENCH_COMMIT:-$(git rev-parse --short HEAD)}  # (the device copy keeps an older HEAD)
timeout 280 python3 scripts/bench.py --shapes llama-3.2-1b,qwen3-1.7b,llama-3.1-8b,smollm2-135m,qwen2.5-0.5b \
  --engines torch-sdpa-graph,kogcupy --new-tokens 256 --positions 0,2000 --ttft-prompts 1000 --agent-turns 2 \
  --sampling '' --graph-repeats 1 --out $OUT > $OUT/bench-$G-$D.log 2>&1
echo "bench rc=$?"; tail -n 14 $OUT/bench-$G-$D.log; date -u
