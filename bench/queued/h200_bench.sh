#!/usr/bin/env bash
# H200 only: the bench of main (README's first table and PERF's "Where the defaults stand" are
# still the thirty-sixth session's H200 run: since then qkv's early tile on the H200, the
# qk-norm gammas and the qkv biases loaded before their waits, one GPU's static default and
# down's depth 8, all measured on H100s only; the dynamic tail's grabs asked ahead and its
# 50-permille share run only in the A/B's tail arm), then one GPU's static default (forty-second
# session) against a 50-permille tail on the H200, then profiles of Qwen3, the 1B and SmolLM2.
# Device call: bash bench/queued/h200_bench.sh   (results under $OUT; ~400 s; exits at once on an H100)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) ;; *) echo "not an H200: nothing run"; exit 0;; esac
C=${KOGCUPY_BENCH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo main)}; export KOGCUPY_BENCH_COMMIT=$C
timeout 300 python3 scripts/bench.py --shapes llama-3.2-1b,qwen3-1.7b,llama-3.1-8b,smollm2-135m,qwen2.5-0.5b \
  --engines torch-sdpa-graph,kogcupy --new-tokens 256 --positions 0,2000 --ttft-prompts 1000 --agent-turns 2 \
  --sampling '' --graph-repeats 1 --out $OUT > $OUT/bench-h200-$(date -u +%F).log 2>&1
echo "bench rc=$?"; tail -n 14 $OUT/bench-h200-$(date -u +%F).log
A='[{}, {"KOG_DYN_PERMILLE": 50}, {}, {"KOG_DYN_PERMILLE": 50}, {}, {"KOG_DYN_PERMILLE": 50}]'
timeout 150 python3 scripts/tune_monokernel.py llama-3.2-1b,qwen3-1.7b,llama-3.1-8b "$A" 256 > $OUT/variants-h200-$(date -u +%F)-static-default.txt 2>&1
echo "tune rc=$?"; python3 scripts/tune_monokernel.py --summarize $OUT/variants-h200-$(date -u +%F)-static-default.txt | tail -n 6
# profiles of the defaults on the H200 (its last traces are s36's, before every change above)
for S in qwen3-1.7b llama-3.2-1b smollm2-135m; do
  timeout 60 python3 -m kogcupy.cli profile --shape $S --out $OUT/trace-$S-h200-$(date -u +%F)-$C.json.gz \
    > $OUT/profile-$S-h200-$(date -u +%F)-$C.txt 2>&1
  echo "profile $S rc=$?"; grep -A6 "critical path" $OUT/profile-$S-h200-$(date -u +%F)-$C.txt | tail -n 6
done
