#!/usr/bin/env bash
# Either GPU (queued in the forty-sixth session): does the code's layout alone move the small
# shapes? code_shift.patch puts KOG_CODE_SHIFT `nanosleep 0` instructions at the kernel's start
# (once a launch), so every later instruction moves by 16 B each (SmolLM2's SASS at shifts
# 0 / 1 / 3: the same instructions but for the sleeps, the calls' return addresses and the NOPs
# that pad the kernel's end to 128 B; shift 1 also swaps two registers in six instructions); shifts 0-7
# cover every offset within a 128-byte line. Asked because the compile-time warp count lost
# 2.4 % on SmolLM2 while it removed work before gate_up's first tile (PERF.md): if the spread
# over the shifts is of that size, SmolLM2's A/B rounds of small kernel edits carry a layout
# term, and the shift that wins says which loops matter.
# Device call: bash bench/queued/code_shift.sh   (results under $OUT; ~200 s)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
F=$OUT/variants-$G-$(date -u +%F)-code-shift.txt; : > $F
git apply bench/queued/code_shift.patch || { echo "the patch does not apply"; exit 1; }
V='{}'; for k in 1 2 3 4 5 6 7; do V="$V, {\"KOG_CODE_SHIFT\": $k}"; done
timeout 400 python3 scripts/tune_monokernel.py smollm2-135m "[$V, $V, $V]" 256 >> $F 2>&1
echo "tune rc=$?"
V='{}, {"KOG_CODE_SHIFT": 2}, {"KOG_CODE_SHIFT": 4}, {"KOG_CODE_SHIFT": 6}'
timeout 200 python3 scripts/tune_monokernel.py qwen2.5-0.5b "[$V, $V, $V]" 256 >> $F 2>&1
echo "tune rc=$?"; python3 scripts/tune_monokernel.py --summarize $F | grep -A14 '^means'
git apply -R bench/queued/code_shift.patch
