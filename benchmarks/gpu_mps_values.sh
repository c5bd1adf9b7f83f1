#!/usr/bin/env bash
# One device call: export pi0, the in-process reference (peers.py, no Triton peers), then the MPS
# values check (benchmarks/mps_values_check.py), and the non-MPS tuned variant as a control.
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
mkdir -p /tmp/pi0_repo && cp model_repository/spec.yaml /tmp/pi0_repo/
python -m export --preset pi0 --views 2 --dtype bf16 --variant gpu --device cuda --repository /tmp/pi0_repo > $OUT/export.log 2>&1 || { tail -20 $OUT/export.log; exit 1; }
python benchmarks/peers.py --repository /tmp/pi0_repo --out /tmp/peers --triton "" --repeats 10 > $OUT/peers.log 2>&1 || tail -20 $OUT/peers.log
for v in ${VARIANTS:-gpu_mps gpu}; do
  python benchmarks/mps_values_check.py --repository /tmp/pi0_repo --reference /tmp/peers/inprocess_actions.npz --variant $v --out /tmp/mps_values_$v ${VALUES_ARGS:-} > $OUT/values_$v.log 2>&1
  tail -5 $OUT/values_$v.log
done
