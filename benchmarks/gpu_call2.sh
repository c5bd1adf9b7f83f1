#!/usr/bin/env bash
# Kept as the record of an earlier run: its 60/40 split gives wrong bf16 products on the H200, and the
# spec's gpu_split_mps is now 50/50 (docs/BENCHMARKS.md).
# Device call 2: the MPS check (two instance groups at 80/20, tiny preset on the GPU), then
# the pi0 encoder/decoder split under MPS (60/40) against the same split time-sliced and against one
# instance per model, under a Locust sweep. Logs and JSON under $OUT.
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
if [ ! -f /tmp/tiny_gpu_repo/encoder/1/manifest.json ]; then
  mkdir -p /tmp/tiny_gpu_repo && cp model_repository/spec.yaml /tmp/tiny_gpu_repo/
  python -m export --preset tiny --views 2 --dtype bf16 --variant gpu --device cuda --repository /tmp/tiny_gpu_repo > $OUT/export_tiny.log 2>&1
fi
timeout 150 python benchmarks/mps_check.py --repository /tmp/tiny_gpu_repo --out $OUT/mps_check.json 2>&1 | grep -vE "^\||^\+|^I1|^W1" | tail -8
cp /tmp/mps_check/tritonserver.log $OUT/mps_check_server.log 2>/dev/null
if [ ! -f /tmp/pi0_repo/encoder/1/manifest.json ]; then
  mkdir -p /tmp/pi0_repo && cp model_repository/spec.yaml /tmp/pi0_repo/
  python -m export --preset pi0 --views 2 --dtype bf16 --variant gpu --device cuda --repository /tmp/pi0_repo > $OUT/export_pi0.log 2>&1
fi
cp model_repository/spec.yaml /tmp/pi0_repo/spec.yaml   # this checkout's variants
timeout 420 python -m loadtest.sweep --compare gpu,gpu_split,gpu_split_mps --repository /tmp/pi0_repo \
  --users 1,8,32 --duration 12 --out /tmp/pi0_compare 2>&1 | tail -32
cp /tmp/pi0_compare/results.json $OUT/pi0_compare_results.json; cp /tmp/pi0_compare/sweep.png $OUT/pi0_compare_sweep.png
pgrep -a "^(nvidia-cuda-mps|tritonserver|triton_python_b)" || echo "no MPS daemon, server or stub left"
