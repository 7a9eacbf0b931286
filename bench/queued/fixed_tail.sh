#!/usr/bin/env bash
# Session 42: down adds a grabbed FFN unit's products as integers, each rounded on its own
# (the working tree), against main's float sums (bench/queued/s42_old/: down.cuh, sync.cuh,
# platform.cuh as on main). First the new GPU test on main's kernel (predicted to fail: which
# block runs a grabbed unit varies run to run) and on the new one; then trees interleaved on
# the shapes with a dynamic tail (rounds told apart by a define no code reads, KOG_TREE); then,
# on an H100, the GPU tests and racecheck / memcheck with a 300-permille tail forced.
# On an H200 the queued H200 bench runs first, on main's kernel.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"; date -u
mkdir -p /tmp/new && cp kernels_src/{down,sync,platform}.cuh /tmp/new/
old() { cp bench/queued/s42_old/*.cuh kernels_src/; }
new() { cp /tmp/new/*.cuh kernels_src/; }
case "$GPU" in *H200*) G=h200; R=2; old; bash bench/queued/h200_bench.sh;; *) G=h100; R=3;; esac
D=$(date -u +%F); T=$OUT/gpu-tests-$G-$D-fixed-tail.txt
old; echo "# main's kernel" > $T
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_monokernel.py -k dynamic_tail_same_bits >> $T 2>&1; echo "old test rc=$?" | tee -a $T
new; echo "# the new kernel" >> $T
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_monokernel.py -k dynamic_tail_same_bits >> $T 2>&1; echo "new test rc=$?" | tee -a $T
grep -E "passed|failed|Mismatch|mismatched" $T | head -12
F=$OUT/variants-$G-$D-fixed-tail.txt; : > $F
for r in $(seq $R); do
  i=0
  for v in old new; do
    $v
    timeout 150 python3 scripts/tune_monokernel.py llama-3.2-1b,qwen3-1.7b,llama-3.1-8b "[{\"KOG_TREE\": $i}]" 256 2>&1 | grep '^{' >> $F
    echo "round $r $v rc=$?"; i=$((i + 1))
  done
done
new
python3 scripts/tune_monokernel.py --summarize $F | tail -n 7
[ "$G" = h100 ] || exit 0
timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $OUT/pytest-gpu-$G-$D-fixed-tail.txt 2>&1; echo "pytest rc=$?"; tail -n 3 $OUT/pytest-gpu-$G-$D-fixed-tail.txt
C=$OUT/gpu-checks-$G-$D-fixed-tail.txt; echo "# racecheck, memcheck (300-permille tail forced, 16 blocks, GQA 2, 80 tokens); $GPU" > $C
for tool in racecheck memcheck; do
  S=$SECONDS
  KOGCUPY_TUNING='{"KOG_DYN_PERMILLE": 300}' timeout 100 compute-sanitizer --tool $tool --target-processes all \
    python3 scripts/sanitize_kernels.py 16 2 80 >> $C 2>&1
  echo "$tool rc=$? in $((SECONDS - S)) s" >> $C
done
grep -E "SUMMARY|rc=" $C; date -u
