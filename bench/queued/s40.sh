#!/usr/bin/env bash
# Fortieth session: `pytest -m gpu` (test_down_first_rows' pinned share not yet run on a GPU),
# then traces of Qwen3 and the 1B with the attention units' new stamp (layer * 16 + 15: the
# chunk's start), whose summary splits a unit's ~3.3 us into q's norm / RoPE / k, v append and
# the chunk + partial stores.
# Device call: bash bench/queued/s40.sh   (results under $OUT; ~150 s)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
D=$(date -u +%F); H=$(git rev-parse --short HEAD); C=$OUT/gpu-checks-$G-$D-s40.txt
echo "# pytest -m gpu; $GPU, main $H" > $C
timeout 200 python3 -m pytest -q -m gpu tests >> $C 2>&1
echo "gpu tests rc=$?" >> $C; tail -n 3 $C
for S in qwen3-1.7b llama-3.2-1b; do
  timeout 60 python3 -m kogcupy.cli profile --shape $S --out $OUT/trace-$S-$G-$D-s40.json.gz \
    > $OUT/profile-$S-$G-$D-s40.txt 2>&1
  echo "profile $S rc=$?"; grep -E "attention|critical|stage " $OUT/profile-$S-$G-$D-s40.txt
done
# the qk-norm gammas loaded before q's wait (main) against after it (the knob patch's 0: the
# code before); Qwen3 only has a qk-norm
git apply bench/queued/gamma_knob.patch || { echo "gamma_knob.patch does not apply"; exit 1; }
A='[{}, {"KOG_QK_GAMMA_EARLY": 0}, {}, {"KOG_QK_GAMMA_EARLY": 0}, {}, {"KOG_QK_GAMMA_EARLY": 0}]'
timeout 200 python3 scripts/tune_monokernel.py qwen3-1.7b,qwen3-1.7b@2000 "$A" 256 > $OUT/variants-$G-$D-qk-gamma.txt 2>&1
echo "tune rc=$?"; git apply -R bench/queued/gamma_knob.patch
grep -v '^{' $OUT/variants-$G-$D-qk-gamma.txt | tail -n 12
# the qkv bias of a warp's first row loaded before the wait (main) against in the epilogue
# (the knob patch's 0: the code before); Qwen2.5 only has a qkv bias
git apply bench/queued/bias_knob.patch || { echo "bias_knob.patch does not apply"; exit 1; }
A='[{}, {"KOG_BIAS_EARLY": 0}, {}, {"KOG_BIAS_EARLY": 0}, {}, {"KOG_BIAS_EARLY": 0}]'
timeout 150 python3 scripts/tune_monokernel.py qwen2.5-0.5b,qwen2.5-0.5b@2000 "$A" 256 > $OUT/variants-$G-$D-bias.txt 2>&1
echo "tune rc=$?"; git apply -R bench/queued/bias_knob.patch
grep -v '^{' $OUT/variants-$G-$D-bias.txt | tail -n 12
