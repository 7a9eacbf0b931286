#!/usr/bin/env bash
# Either GPU (PERF.md, "gate_up streams slower than down on every shape"): gate_up's weight tiles
# through a ring of KOG_GATE_UP_RING shared-memory slots a warp (cp.async, as down's rows; static
# units only, so the tail is off: KOG_DYN_PERMILLE 0) against main's two register tiles, from
# bench/queued/gate_up_ring.patch (default builds PTX-identical to main; ring 3: 217 KB of shared
# memory a block on the 1B / Qwen3, no new spills). Correctness first, then interleaved rounds.
# Device call: bash bench/queued/gate_up_ring.sh   (results under $OUT; ~250 s)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
D=$(date -u +%F)
git apply bench/queued/gate_up_ring.patch || { echo "the patch does not apply"; exit 1; }
KOGCUPY_TUNING='{"KOG_GATE_UP_RING": 3, "KOG_DYN_PERMILLE": 0}' timeout 150 python3 -m pytest -q -p no:cacheprovider \
  tests/test_gpu_monokernel.py -k "stages_match or logits_match or greedy_tokens or long_prompt or long_context" \
  > $OUT/gpu-tests-$G-$D-gate-up-ring.txt 2>&1
echo "tests with the ring rc=$?"; tail -n 2 $OUT/gpu-tests-$G-$D-gate-up-ring.txt
R='{}, {"KOG_GATE_UP_RING": 3, "KOG_DYN_PERMILLE": 0}, {"KOG_DYN_PERMILLE": 0}, {"KOG_GATE_UP_RING": 2, "KOG_DYN_PERMILLE": 0}'
timeout 200 python3 scripts/tune_monokernel.py llama-3.2-1b,qwen3-1.7b,llama-3.1-8b "[$R, $R, $R]" 256 > $OUT/variants-$G-$D-gate-up-ring.txt 2>&1
echo "tune rc=$?"
B='[{}, {"KOG_GATE_UP_RING": 3}, {"KOG_GATE_UP_RING": 2}, {}, {"KOG_GATE_UP_RING": 3}, {"KOG_GATE_UP_RING": 2}]'
timeout 100 python3 scripts/tune_monokernel.py smollm2-135m,qwen2.5-0.5b "$B" 256 > $OUT/variants-$G-$D-gate-up-ring-small.txt 2>&1
echo "tune rc=$?"
git apply -R bench/queued/gate_up_ring.patch
python3 scripts/tune_monokernel.py --summarize $OUT/variants-$G-$D-gate-up-ring.txt | tail -n 13
python3 scripts/tune_monokernel.py --summarize $OUT/variants-$G-$D-gate-up-ring-small.txt | tail -n 7
