#!/usr/bin/env bash
# Inductor's own tuning for the encoder's layers, against the layers as served: the whole encoder's graph
# replayed back to back by benchmarks/sustained_clock.py (its answers checked against the export's golden
# samples first), compiled as served, then with Inductor choosing each product among cuBLAS and its own
# Triton templates by timing them (max_autotune_gemm; a template may then take the bias, GELU or GeGLU in
# its epilogue), with its Triton kernels' launch settings tuned (coordinate_descent_tuning), and with both;
# then as served again; each table row ends with the run's set-up time. BATCHES (default "16 1") says which
# buckets. Each run's JSON lands in $OUT, its log in /tmp; a run starts only while $BUDGET seconds (default
# 420) since the first have not passed. One device call:
#   export OUT=$OUT && bash benchmarks/gpu_encoder_autotune.sh
cd "$(dirname "$0")/.."
export OUT=${OUT:-reports/gpu}
source benchmarks/gpu_pi0.sh
nvidia-smi -i 0 --query-gpu=clocks.sm,power.draw,power.limit,temperature.gpu --format=csv,noheader
runs=()
for b in ${BATCHES:-16 1}; do
  runs+=("encoder $b pi0_repo" "encoder $b pi0_repo gemm --inductor max_autotune_gemm=True"
    "encoder $b pi0_repo descent --inductor coordinate_descent_tuning=True"
    "encoder $b pi0_repo both --inductor max_autotune_gemm=True --inductor coordinate_descent_tuning=True"
    "encoder $b pi0_repo again")
done
clock_runs autotune "${BUDGET:-420}" 10 6 "${runs[@]}"
nvidia-smi -i 0 --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader
