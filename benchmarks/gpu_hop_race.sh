#!/usr/bin/env bash
# One run on a GPU machine: benchmarks/hop_race_check.py over the pi0 `gpu` export (see that script).
cd "$(dirname "$0")/.."
source benchmarks/gpu_pi0.sh
python benchmarks/hop_race_check.py --repository /tmp/pi0_repo --out $OUT/hop.json "$@" > $OUT/hop.log 2>&1
grep -v "^\[" $OUT/hop.log | tail -8
