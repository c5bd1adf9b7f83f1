#!/usr/bin/env bash
# One device call: export pi0 (bf16, 2 views) on the GPU, profile the served runtime's CUDA
# graphs, then run the peers benchmark. Logs and results land in $OUT.
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
mkdir -p /tmp/pi0_repo && cp model_repository/spec.yaml /tmp/pi0_repo/
python -m export --preset pi0 --views 2 --dtype bf16 --variant gpu --device cuda --repository /tmp/pi0_repo > $OUT/export.log 2>&1 || { tail -20 $OUT/export.log; exit 1; }
grep -E "done in|parity at batch 1" $OUT/export.log
if [ "${PROFILE:-1}" = 1 ]; then
  python benchmarks/profile_runtime.py --repository /tmp/pi0_repo --buckets 1,16 ${PROFILE_ARGS:---compile} --out $OUT/profile.json > $OUT/profile.log 2>&1
  tail -5 $OUT/profile.log
fi
python benchmarks/peers.py --repository /tmp/pi0_repo --out /tmp/peers ${PEERS_ARGS:---users 1,4,8,16,32 --duration 10 --repeats 40} > $OUT/peers.log 2>&1
cp /tmp/peers/results*.json $OUT/ 2>/dev/null
grep -v "^\[serve\] \[" $OUT/peers.log | tail -30
