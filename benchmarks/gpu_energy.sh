#!/usr/bin/env bash
# What the GPU's power limit leaves for throughput: pi0's graphs (bf16, the `gpu` variant as served, and the
# encoder of `gpu_one_model_fp8`) replayed back to back by benchmarks/sustained_clock.py, each with its answers
# checked against the export's golden samples first, its time under sustained load and the energy it used
# (NVML's counter) per answer: the encoder and decoder at bucket 16, the fp8 encoder at 16, then both at 1.
# Each run's JSON rows land in $OUT, its log in /tmp (a call brings back 8 files); a run starts only while
# $BUDGET seconds (default 360) since the first have not passed. One device call:
#   export OUT=$OUT && bash benchmarks/gpu_energy.sh
cd "$(dirname "$0")/.."
export OUT=${OUT:-reports/gpu}
source benchmarks/gpu_pi0.sh
python -m vlaserve.repository --repository /tmp/pi0_repo --variant gpu_one_model_fp8 --out /tmp/pi0_fp8 \
  > /tmp/fp8-repo.log 2>&1 || { tail -5 /tmp/fp8-repo.log; exit 1; }
nvidia-smi -i 0 --query-gpu=clocks.sm,clocks.max.sm,power.draw,power.limit,enforced.power.limit,temperature.gpu --format=csv
clock_runs energy "${BUDGET:-360}" 10 6 "encoder,decoder 16 pi0_repo" "encoder 16 pi0_fp8" "encoder,decoder 1 pi0_repo"
nvidia-smi -i 0 --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader
