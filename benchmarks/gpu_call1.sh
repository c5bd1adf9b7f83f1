#!/usr/bin/env bash
# Device call 1: environment, pi0 export, the served pi0 against in-process,
# and the MPS check with two instance groups at 80/20. Logs and JSON under $OUT.
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_mode --format=csv | tee $OUT/gpu.txt
python -c 'import torch, numpy; print("torch", torch.__version__, "numpy", numpy.__version__, torch.cuda.get_device_properties(0))' | tee -a $OUT/gpu.txt
if [ ! -f /tmp/pi0_repo/encoder/1/manifest.json ]; then
  mkdir -p /tmp/pi0_repo && cp model_repository/spec.yaml /tmp/pi0_repo/
  /usr/bin/time -v python -m export --preset pi0 --views 2 --dtype bf16 --variant gpu --device cuda \
    --repository /tmp/pi0_repo 2>&1 | tee $OUT/export_pi0.log | grep -vE "^\s+(Average|Exit|Page|File|Socket|Signals|Swaps|Volun|Invol|Minor|Major|Percent|System|User)"
  ls -la /tmp/pi0_repo/*/1/ | tee -a $OUT/export_pi0.log
fi
timeout 300 python benchmarks/serve_check.py --repository /tmp/pi0_repo --out $OUT/serve_check_pi0.json 2>&1 | tail -30
if [ ! -f /tmp/tiny_repo/encoder/1/manifest.json ]; then
  mkdir -p /tmp/tiny_repo && cp model_repository/spec.yaml /tmp/tiny_repo/
  python -m export --preset tiny --views 2 --dtype bf16 --variant gpu --device cuda --repository /tmp/tiny_repo > $OUT/export_tiny.log 2>&1
fi
timeout 200 python benchmarks/mps_check.py --repository /tmp/tiny_repo --out $OUT/mps_check.json 2>&1 | tail -20
cp /tmp/serve_check/tritonserver.log $OUT/serve_check_server.log 2>/dev/null
cp /tmp/mps_check/tritonserver.log $OUT/mps_check_server.log 2>/dev/null
