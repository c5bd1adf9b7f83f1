#!/usr/bin/env bash
# The fused decoder with programmatic dependent launch off, on ("launch") and with each kernel asking the L2
# cache for its weights first ("prefetch"), every answer checked. Two device calls (each fits the 10-minute
# limit of one):
#   bash benchmarks/gpu_pdl.sh           in-process at batch 1 and 4, each mode compared with eager PyTorch's
#                                        actions (benchmarks/decoder_kernels.py --kinds "": no per-kind sweep)
#   SERVE=1 bash benchmarks/gpu_pdl.sh   pi0 served as gpu_one_model, one server start as it is and one with
#                                        VLASERVE_FUSED_PDL=$SERVE_PDL (default prefetch), one request at a time
#                                        and under load (benchmarks/served_breakdown.py)
cd "$(dirname "$0")/.."
set -o pipefail
if [ -z "$SERVE" ]; then
  source benchmarks/gpu_env.sh
  OUT=${OUT:-reports/gpu} && mkdir -p "$OUT"
  for batch in ${BATCHES:-1 4}; do
    python -m benchmarks.decoder_kernels --batch "$batch" --kinds "" --pdl off,launch,prefetch \
      --out "$OUT/pdl-batch$batch.json" > "$OUT/pdl-batch$batch.log" 2>&1
    grep "^decoder" "$OUT/pdl-batch$batch.log" | sed "s/^/batch $batch: /" || tail -5 "$OUT/pdl-batch$batch.log"
  done
else
  source benchmarks/gpu_pi0.sh
  python -m benchmarks.served_breakdown --repository /tmp/pi0_repo --variants gpu_one_model --requests 200 \
    --env "" --env "VLASERVE_FUSED_PDL=${SERVE_PDL:-prefetch}" --clients "${CLIENTS:-16}" --seconds 12 \
    --out "$OUT/served-pdl.json" > "$OUT/served-pdl.log" 2>&1
  grep -v "^\[serve\] \[" "$OUT/served-pdl.log" | tail -14
fi
