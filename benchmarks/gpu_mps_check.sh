#!/usr/bin/env bash
# One run on a GPU machine, output under $OUT (default reports/gpu): export pi0 (bf16, 2 views, with
# golden samples), `make mps-check` (the product screen at 21 percentages, then products and golden
# samples at a few), the refusal / right-answer check of a wrong and a right split
# (benchmarks/mps_values_check.py), and the self-contained cuBLAS repro with the workarounds it tries.
# Needs .carry/ (bash benchmarks/build_carry.sh, here).
cd "$(dirname "$0")/.."
source benchmarks/gpu_pi0.sh
W=/tmp/mpsw && mkdir -p $W
python -m vlaserve.mps_check --repository /tmp/pi0_repo --no-golden --workdir $W --out $OUT/mps-check-products.json \
  --percentages ${SCREEN:-10,15,20,25,30,33,35,40,45,50,55,60,65,70,75,80,85,90,95,99,100} > $OUT/mps-check-products.log 2>&1
tail -25 $OUT/mps-check-products.log
python -m vlaserve.mps_check --repository /tmp/pi0_repo --workdir $W --percentages ${GOLDEN:-25,40,50,60,90,100} > $OUT/mps-check.log 2>&1
tail -10 $OUT/mps-check.log; cp $W/mps-check.json $OUT/
python benchmarks/mps_values_check.py --repository /tmp/pi0_repo --workdir $W --splits ${SPLITS:-40:40,50:50} --out $OUT/values.json > $OUT/values.log 2>&1
grep -v "^\[serve\] \[" $OUT/values.log | tail -14
if [ "${REPRO:-1}" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=$W/repro-pipe CUDA_MPS_LOG_DIRECTORY=$W/repro-log && mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  nvidia-cuda-mps-control -d && python benchmarks/mps_gemm_repro.py --percentages ${REPRO_PCTS:-40,50,60,100} ${REPRO_ARGS:-} --json $OUT/repro.json > $OUT/repro.log 2>&1
  echo quit | nvidia-cuda-mps-control; cat $OUT/repro.log | cut -c1-400
fi
