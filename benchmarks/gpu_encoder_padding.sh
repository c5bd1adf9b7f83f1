#!/usr/bin/env bash
# The vision layers compiled without Inductor's stride padding (as served) and with it (as before): one
# SigLIP layer of each form side by side (benchmarks/encoder_attention_probe.py, with the library calls
# Inductor generated), then the whole encoder's graph replayed back to back by benchmarks/sustained_clock.py,
# its answers checked against the export's golden samples first: at bucket 16 served, padded, served again;
# at 1 served, padded. Each run's JSON lands in $OUT, its log in /tmp; a run starts only while $BUDGET
# seconds (default 380) since the first have not passed. One device call:
#   export OUT=$OUT && bash benchmarks/gpu_encoder_padding.sh
cd "$(dirname "$0")/.."
export OUT=${OUT:-reports/gpu}
source benchmarks/gpu_pi0.sh
python -m benchmarks.encoder_attention_probe --batches 1,16 --out "$OUT/probe.json" > /tmp/probe.log 2>&1
grep -E '^siglip layer +[0-9]+ (default|padded|bias after) ' /tmp/probe.log || tail -5 /tmp/probe.log
grep -E '^siglip layer 16 (default|padded) calls: extern' /tmp/probe.log
nvidia-smi -i 0 --query-gpu=clocks.sm,power.draw,power.limit,temperature.gpu --format=csv,noheader
PADDED="padded --inductor comprehensive_padding=True"
clock_runs padding "${BUDGET:-380}" 10 6 "encoder 16 pi0_repo" "encoder 16 pi0_repo $PADDED" \
  "encoder 16 pi0_repo again" "encoder 1 pi0_repo" "encoder 1 pi0_repo $PADDED"
nvidia-smi -i 0 --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader
