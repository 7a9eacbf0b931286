#!/usr/bin/env bash
# Forty-fifth session's first device call: the H200's bench and profiles when an H200 comes,
# else the checks of a37fef9 (A/B, sanitizer, multigpu on one GPU).
cd "$(dirname "$0")/../.."
case "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" in
  *H200*) bash bench/queued/h200_bench.sh;;
  *) bash bench/queued/dot_finish_checks.sh;;
esac
