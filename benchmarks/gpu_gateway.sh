#!/usr/bin/env bash
# One device call: the openpi gateway's cost on the GPU. pi0 (bf16, 2 views) served as gpu_one_model; a DROID
# observation through the gateway (openpi's own client) against the same request straight to Triton over
# gRPC, one at a time and under closed-loop load, every answer checked against the in-process actions.
# Needs the carry with the gateway's packages (make carry).
cd "$(dirname "$0")/.."
source benchmarks/gpu_pi0.sh
python -m benchmarks.gateway_overhead --repository /tmp/pi0_repo --variant gpu_one_model --requests 100 --rounds "${ROUNDS:-2}" \
  --clients "${CLIENTS:-16}" --seconds 15 --out "$OUT/gateway-h200.json" > "$OUT/gateway.log" 2>&1
grep -v "^\[serve\] \[" "$OUT/gateway.log" | tail -6
