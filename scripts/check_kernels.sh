#!/usr/bin/env bash
# Compile every kernel source for NVIDIA sm_90 (nvcc) and AMD gfx90a (hipcc), as CI does.
case "${1:-}" in -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0;; esac   # usage: the header
set -euo pipefail
cd "$(dirname "$0")/.."
KOGCUPY_REQUIRE_COMPILERS=${KOGCUPY_REQUIRE_COMPILERS:-1} python -m pytest -q tests/test_kernel_compile.py "$@"
