#!/usr/bin/env bash
# One run on a GPU machine, output under $OUT (default reports/gpu): export pi0 (bf16, 2 views), then
# benchmarks/guard_check.py over the `gpu` variant: batch-1 latency through the HTTP guard and without
# it, the crash request, and how the server stops. Needs .carry/ (bash benchmarks/build_carry.sh, here).
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
OUT=${OUT:-reports/gpu} && mkdir -p "$OUT"
mkdir -p /tmp/pi0_repo && cp model_repository/spec.yaml /tmp/pi0_repo/
if [ ! -f /tmp/pi0_repo/decoder/1/golden.pt ]; then
  python -m export --preset pi0 --views 2 --dtype bf16 --variant gpu --device cuda --repository /tmp/pi0_repo > $OUT/export.log 2>&1 || { tail -20 $OUT/export.log; exit 1; }
  grep -E "done in" $OUT/export.log
fi
python benchmarks/guard_check.py --repository /tmp/pi0_repo --variant gpu --out $OUT/guard.json > $OUT/guard.log 2>&1
grep -v "^\[serve\] \[" $OUT/guard.log | tail -8
