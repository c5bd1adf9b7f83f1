#!/usr/bin/env bash
# Device call 4: the MPS split again with a 2 GB CUDA memory pool (the stub had logged "failed to copy
# data" when prefix_kv batches outgrew Triton's 64 MB pool), and the served values checked under it.
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
if [ ! -f /tmp/pi0_repo/encoder/1/manifest.json ]; then
  mkdir -p /tmp/pi0_repo && cp model_repository/spec.yaml /tmp/pi0_repo/
  python -m export --preset pi0 --views 2 --dtype bf16 --variant gpu --device cuda --repository /tmp/pi0_repo > $OUT/export_pi0.log 2>&1
fi
cp model_repository/spec.yaml /tmp/pi0_repo/spec.yaml
rm -rf /tmp/pi0_compare
timeout 300 python -m loadtest.sweep --compare gpu_split_mps --repository /tmp/pi0_repo --cuda-memory-pool-mb 2048 \
  --users 8,32 --duration 10 --out /tmp/pi0_compare > $OUT/sweep.log 2>&1
grep -vE "^\[serve\] \[" $OUT/sweep.log | tail -14
echo "stub copy errors: $(grep -c 'failed to copy data' /tmp/pi0_compare/servers/gpu_split_mps/tritonserver.log)"
cp /tmp/pi0_compare/results.json $OUT/pi0_mps_pool_results.json
