#!/usr/bin/env bash
# Kept as the record of an earlier run: its 60/40 split gives wrong bf16 products on the H200, and the
# spec's gpu_split_mps is now 50/50 (docs/BENCHMARKS.md).
# Device call 3: the pi0 encoder/decoder split under MPS (60/40) against the same split
# time-sliced and against one instance per model, under a Locust sweep (bucketed batches, warmed up).
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
if [ ! -f /tmp/pi0_repo/encoder/1/manifest.json ]; then
  mkdir -p /tmp/pi0_repo && cp model_repository/spec.yaml /tmp/pi0_repo/
  python -m export --preset pi0 --views 2 --dtype bf16 --variant gpu --device cuda --repository /tmp/pi0_repo > $OUT/export_pi0.log 2>&1
fi
cp model_repository/spec.yaml /tmp/pi0_repo/spec.yaml   # this checkout's variants
rm -rf /tmp/pi0_compare
timeout 500 python -m loadtest.sweep --compare gpu,gpu_split,gpu_split_mps --repository /tmp/pi0_repo \
  --users 1,8,32 --duration 10 --out /tmp/pi0_compare > $OUT/sweep.log 2>&1
grep -vE "^\[serve\] \[" $OUT/sweep.log | tail -32
cp /tmp/pi0_compare/results.json $OUT/pi0_compare_results.json; cp /tmp/pi0_compare/sweep.png $OUT/pi0_compare_sweep.png
cat /tmp/pi0_compare/*failures.csv 2>/dev/null | sort | uniq -c | sort -rn | head -5 > $OUT/failures.txt
for v in gpu gpu_split gpu_split_mps; do grep -E "^E|warmup|ready" /tmp/pi0_compare/servers/$v/tritonserver.log | tail -5 | cut -c1-300; done > $OUT/server_tails.txt
pgrep -a "^(nvidia-cuda-mps|tritonserver|triton_python_b)" || echo "no MPS daemon, server or stub left"
