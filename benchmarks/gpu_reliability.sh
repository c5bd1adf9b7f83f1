#!/usr/bin/env bash
# One run on a GPU machine, output under $OUT (default reports/gpu): export pi0 (bf16, 2 views, the `gpu`
# variant), then `python -m loadtest.reliability --quick` over it: crash requests, malformed bodies,
# admin key, overload (128 users), soak, a killed decoder instance, SIGTERM under load. The schema fuzz
# is left out here (it needs schemathesis, which the carry leaves out; it tests the HTTP path, the same
# on every device). $SKIP names the checks to leave out (default: fuzz); extra arguments go to the suite
# (e.g. SKIP=fuzz,stub-kill bash benchmarks/gpu_reliability.sh --soak-seconds 60).
# Needs .carry/ (bash benchmarks/build_carry.sh, here).
cd "$(dirname "$0")/.."
source benchmarks/gpu_pi0.sh
python -m loadtest.reliability --repository /tmp/pi0_repo --quick --skip "${SKIP:-fuzz}" "$@" --out /tmp/reliability \
  > $OUT/reliability.log 2>&1
cp /tmp/reliability/results.json $OUT/reliability.json
tail -14 $OUT/reliability.log
