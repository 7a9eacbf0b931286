#!/usr/bin/env bash
# One multi-GPU device call: KCCL and tensor-parallel tests (pytest -m multigpu), then decode
# tok/s, cold TTFT and the agent workload of the monokernel at 1, 2 and 4 GPUs (scripts/bench.py
# --gpus). Logs under $OUT.
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0;; esac   # usage: the header
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # never multicast
nvidia-smi --query-gpu=index,name --format=csv,noheader | tee "$OUT/gpu.txt"
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
rc=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout ${TEST_TIMEOUT:-420} python3 -m pytest -q -x -p no:cacheprovider -m multigpu \
      ${TEST_FILES:-tests/test_multigpu_tp.py tests/test_multigpu_kccl.py} ${PYTEST_ARGS:-} \
      2>&1 | tee "$OUT/pytest-multigpu.txt" | tail -n 30
  rc=${PIPESTATUS[0]}
fi
if [ "$rc" = 0 ] && [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout ${BENCH_TIMEOUT:-300} python3 scripts/bench.py --shapes ${SHAPES:-llama-3.2-1b,qwen3-1.7b} \
      --engines ${ENGINES:-kogcupy} --gpus ${GPUS:-1,2,4} --positions 0 \
      --ttft-prompts ${TTFT:-1000,8000} --agent-turns ${AGENT_TURNS:-4} \
      --out "$OUT" 2>&1 | tee "$OUT/bench.txt" | tail -n 14
fi
exit $rc
