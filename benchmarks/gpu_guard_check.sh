#!/usr/bin/env bash
# One run on a GPU machine, output under $OUT (default reports/gpu): export pi0 (bf16, 2 views), then
# benchmarks/guard_check.py over the `gpu` variant: batch-1 latency through the HTTP guard and without
# it, the crash request, and how the server stops. Needs .carry/ (bash benchmarks/build_carry.sh, here).
cd "$(dirname "$0")/.."
source benchmarks/gpu_pi0.sh
python benchmarks/guard_check.py --repository /tmp/pi0_repo --variant gpu --out $OUT/guard.json > $OUT/guard.log 2>&1
grep -v "^\[serve\] \[" $OUT/guard.log | tail -8
