#!/usr/bin/env bash
# One device call: the fused decoder's residual products swept at batch 1 and the whole decoder checked
# against eager PyTorch (benchmarks/decoder_kernels.py), then pi0 served as gpu_one_model one request at a
# time and under closed-loop load, every answer checked (benchmarks/served_breakdown.py).
cd "$(dirname "$0")/.."
source benchmarks/gpu_pi0.sh
python -m benchmarks.decoder_kernels --batch 1 --kinds "${KINDS:-out,down}" --out "$OUT/decoder-kernels.json" > "$OUT/decoder-kernels.log" 2>&1
grep -v "^\[kernels\] compil" "$OUT/decoder-kernels.log" | tail -9
python -m benchmarks.served_breakdown --repository /tmp/pi0_repo --variants gpu_one_model --requests 200 \
  --clients "${CLIENTS:-16,24}" --seconds 12 --out "$OUT/served.json" > "$OUT/served.log" 2>&1
grep -v "^\[serve\] \[" "$OUT/served.log" | tail -14
