#!/usr/bin/env bash
# End to end on a multi-GPU machine: `kogcupy generate --gpus N` on tiny random HF checkpoints
# (written by tests/tiny_models.py with their tokenizer), greedy, for N = 1, 2, 4; the texts
# must be the same. Logs under $OUT.
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0;; esac   # usage: the header
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/tests
rc=0
for fam in ${FAMILIES:-llama qwen3}; do
  python3 -c "from tiny_models import build_hf_model; build_hf_model('$fam', '/tmp/kog-$fam')" || exit 1
  for g in ${GPUS:-1 2 4}; do
    timeout 120 python3 -c "from kogcupy.cli import main; main()" generate "Once upon a time" \
        --model /tmp/kog-$fam --gpus "$g" --no-chat --max-new-tokens 32 \
        > "$OUT/$fam-gpus$g.txt" 2> "$OUT/$fam-gpus$g.err"
    echo "$fam --gpus $g: exit $? | $(tail -n 1 "$OUT/$fam-gpus$g.err")"
    cmp -s "$OUT/$fam-gpus1.txt" "$OUT/$fam-gpus$g.txt" || { echo "  text differs from --gpus 1"; rc=1; }
  done
  echo "  text: $(head -c 160 "$OUT/$fam-gpus1.txt" | tr '\n' ' ')"
done
exit $rc
