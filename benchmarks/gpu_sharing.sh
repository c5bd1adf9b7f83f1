#!/usr/bin/env bash
# One run on a GPU machine, output under $OUT (default reports/gpu): is sharing the GPU worth it, with
# every answer checked? pi0 (bf16, 2 views) served by the spec variants of the benchmarks/peers.py peers
# named in PEERS, under the same Locust sweep. Each peer's batch-1 actions are checked against the
# export's golden samples, and every instance checked its own products and golden samples at start.
# Needs .carry/ (bash benchmarks/build_carry.sh, here).
cd "$(dirname "$0")/.."
source benchmarks/gpu_pi0.sh
TAG=${TAG:-sharing}
python benchmarks/peers.py --repository /tmp/pi0_repo --reference golden --triton ${PEERS:-triton_tuned,triton_split} \
  --users ${USERS:-1,4,8,16,32} --duration ${DURATION:-8} --repeats 30 --out /tmp/$TAG > $OUT/$TAG.log 2>&1
cp /tmp/$TAG/results.json $OUT/$TAG.json 2>/dev/null || cp /tmp/$TAG/results-partial.json $OUT/$TAG-partial.json
grep -v "^\[serve\] \[" $OUT/$TAG.log | tail -20
