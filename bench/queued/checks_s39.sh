#!/usr/bin/env bash
# Queued by the thirty-ninth session: what its H100 call did not reach. compute-sanitizer
# racecheck on the grabs-ahead tail (a 300-permille tail forced on the sanitizer's tiny model;
# 80 greedy tokens: racecheck on the pairs kernel needs ~96 s for 200 positions on an H200 and
# was cut at 90 s on the H100 of 2026-12-07), `pytest -m multigpu` on one GPU (ranks sharing it:
# the tensor-parallel gate_up runs the new tail and the 50-permille share), then on an H200 the
# bench of main (the README's first table and PERF's "Where the defaults stand").
# Device call: bash bench/queued/checks_s39.sh   (results under $OUT; ~400 s on an H200)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
D=$(date -u +%F); H=$(git rev-parse --short HEAD); C=$OUT/gpu-checks-$G-$D-racecheck.txt
echo "# racecheck (300-permille tail forced, 16 blocks, GQA 2, 80 tokens), pytest -m multigpu on one GPU; $GPU, main $H" > $C
S=$SECONDS
KOGCUPY_TUNING='{"KOG_DYN_PERMILLE": 300}' timeout 200 compute-sanitizer --tool racecheck --target-processes all \
  python3 scripts/sanitize_kernels.py 16 2 80 >> $C 2>&1
echo "racecheck rc=$? in $((SECONDS - S)) s" >> $C
timeout 150 python3 -m pytest -q -m multigpu tests >> $C 2>&1
echo "multigpu rc=$?" >> $C
grep -E "SUMMARY|rc=|passed|failed" $C
[ "$G" = h200 ] || exit 0
export KOGCUPY_BENCH_COMMIT=$H
timeout 220 python3 scripts/bench.py --shapes llama-3.2-1b,qwen3-1.7b,llama-3.1-8b,smollm2-135m,qwen2.5-0.5b \
  --engines torch-sdpa-graph,kogcupy --new-tokens 256 --positions 0,2000 --ttft-prompts 1000 --agent-turns 2 \
  --sampling '' --graph-repeats 1 --out $OUT > $OUT/bench-$G-$D.log 2>&1
echo "bench rc=$?"; tail -n 14 $OUT/bench-$G-$D.log
