#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck on a small monokernel run (needs a GPU). One GPU's
# default places every unit statically; KOGCUPY_TUNING='{"KOG_DYN_PERMILLE": 300}' covers the
# dynamic tail's path too.
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0;; esac   # usage: the header
set -uo pipefail
cd "$(dirname "$0")/.."
BLOCKS=${1:-16}
GQA=${2:-2}       # q heads per kv head of the tiny model (12: two 8-head attention tiles)
shift 2 2>/dev/null || shift $#   # the rest: sanitize_kernels.py's [greedy tokens] [head_dim] [hidden]
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool (grid $BLOCKS blocks, GQA $GQA)"
  timeout ${SANITIZE_TIMEOUT:-400} compute-sanitizer --tool "$tool" --target-processes all \
      python3 scripts/sanitize_kernels.py "$BLOCKS" "$GQA" "$@" 2>&1 | tail -n 6
done
