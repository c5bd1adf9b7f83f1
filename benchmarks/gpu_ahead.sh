#!/usr/bin/env bash
# The fused decoder with each kernel asking the L2 cache, as it starts, for the weights of a later kernel
# (vlaserve.model.kernels.AHEAD_SCHEDULES: off, next, early), in-process at batch 1 and 4, each schedule's
# actions compared with eager PyTorch's (benchmarks/decoder_kernels.py --kinds "": no per-kind sweep; MERGES=last,kernel
# also merges the attention's key splits in a kernel of their own, SCHEDULES=off only the default schedule); then,
# with GEGLU=1, the encoder's gate/up product with GeGLU in its epilogue (benchmarks/geglu_gemm.py). One
# device call, carrying .carry/site-packages.tar.xz:
#   bash benchmarks/gpu_ahead.sh
cd "$(dirname "$0")/.."
set -o pipefail
source benchmarks/gpu_env.sh
OUT=${OUT:-reports/gpu} && mkdir -p "$OUT"
for batch in ${BATCHES:-1 4}; do
  python -m benchmarks.decoder_kernels --batch "$batch" --kinds "" --ahead "${SCHEDULES:-off,next,early}" \
    --merge "${MERGES:-last}" --out "$OUT/ahead-batch$batch.json" > "$OUT/ahead-batch$batch.log" 2>&1
  grep "^decoder" "$OUT/ahead-batch$batch.log" | sed "s/^/batch $batch: /" || tail -5 "$OUT/ahead-batch$batch.log"
done
if [ "${GEGLU:-0}" = 1 ]; then
  python -m benchmarks.geglu_gemm --batches 1,16 --out "$OUT/geglu-gemm.json" > "$OUT/geglu-gemm.log" 2>&1
  tail -15 "$OUT/geglu-gemm.log"
fi
