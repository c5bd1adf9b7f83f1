#!/usr/bin/env bash
# The fused decoder with programmatic dependent launch off, on ("launch") and with each kernel asking the L2
# cache for its weights first ("prefetch"), in-process at batch 1 and 4, each mode's actions compared with
# eager PyTorch's (benchmarks/decoder_kernels.py --kinds "": no per-kind sweep). One device call:
#   bash benchmarks/gpu_pdl.sh
# On the H200 both dependent-launch modes were slower than launching as usual (docs/BENCHMARKS.md), so
# nothing serves them; this is the run to repeat when the kernels change.
cd "$(dirname "$0")/.."
set -o pipefail
source benchmarks/gpu_env.sh
OUT=${OUT:-reports/gpu} && mkdir -p "$OUT"
for batch in ${BATCHES:-1 4}; do
  python -m benchmarks.decoder_kernels --batch "$batch" --kinds "" --pdl off,launch,prefetch \
    --out "$OUT/pdl-batch$batch.json" > "$OUT/pdl-batch$batch.log" 2>&1
  grep "^decoder" "$OUT/pdl-batch$batch.log" | sed "s/^/batch $batch: /" || tail -5 "$OUT/pdl-batch$batch.log"
done
