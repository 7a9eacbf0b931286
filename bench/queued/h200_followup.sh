#!/usr/bin/env bash
# H200 (queued in the forty-ninth session; an H100 runs the profile and the probe only): the 8B against a dynamic tail (+0.7 % on an
# H100, PERF.md "The dynamic tail on the 8B"; three interleaved rounds, 25 and 50 permille),
# then an 8B profile (none since 2026-12-04: where its last ~11 % below the read limit goes),
# then scripts/burst_probe.py loaded and idle (none committed from an H200).
# Device call (kind nvidia-h200): bash bench/queued/h200_followup.sh   (results under $OUT; ~200 s)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) G=h200;; *) echo "not an H200: no A/B (measured on an H100 in s49)"; G=h100;; esac
D=$(date -u +%F)
if [ $G = h200 ]; then
  F=$OUT/variants-$G-$D-tail-8b.txt
  timeout 300 python3 scripts/tune_monokernel.py llama-3.1-8b \
    '[{}, {"KOG_DYN_PERMILLE": 25}, {"KOG_DYN_PERMILLE": 50}, {}, {"KOG_DYN_PERMILLE": 25}, {"KOG_DYN_PERMILLE": 50}, {}, {"KOG_DYN_PERMILLE": 25}, {"KOG_DYN_PERMILLE": 50}]' 256 > $F 2>&1
  echo "8B A/B rc=$?"; python3 scripts/tune_monokernel.py --summarize $F | grep -A6 '^means'
fi
timeout 150 python3 -m kogcupy.cli profile --shape llama-3.1-8b \
  --out $OUT/trace-llama-3.1-8b-$G-$D-s50.json.gz > $OUT/profile-llama-3.1-8b-$G-$D-s50.txt 2>&1
echo "profile rc=$?"; head -30 $OUT/profile-llama-3.1-8b-$G-$D-s50.txt
for M in "" idle; do
  timeout 120 python3 scripts/burst_probe.py $M > $OUT/burst-probe-$G-$D${M:+-$M}.txt 2>&1
  echo "burst_probe $M rc=$?"; tail -n 12 $OUT/burst-probe-$G-$D${M:+-$M}.txt
done
