#!/usr/bin/env bash
# One device call, about 3.5 minutes (run on the H200 on 2026-12-04: docs/BENCHMARKS.md):
# benchmarks/stream_probe.py, the decoder's chained products at batch 1 with each program's weights streamed
# into shared memory ahead across layers, against one launch a layer and the served decoder's own kernels.
# It serves nothing: carry .carry/site-packages.tar.xz alone. PRODUCTS (comma-separated
# NxK:BNxBKsSTAGESaA_STAGESwWARPS[kSPLITS][q] settings) replaces the default sweep, the one of that run.
#   bash benchmarks/gpu_stream_probe.sh
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
export OUT=${OUT:-reports/gpu} && mkdir -p "$OUT"
PRODUCTS=${PRODUCTS:-\
8192x1024:64x128s4a8w4,8192x1024:64x128s6a6w4,8192x1024:64x128s2a8w4,\
2560x1024:32x128s4a8w4q,2560x1024:32x128s4a8w4,2560x1024:32x128s8a4w4q,2560x1024:32x256s2a4w4q,\
1024x2048:64x128s4a2w4k8q,1024x2048:64x128s4a2w4k8,1024x2048:32x128s4a4w4k4q,1024x2048:8x128s16a8w4q,\
1024x4096:32x128s4a4w4k4q,1024x4096:64x128s4a2w4k8q,1024x4096:32x256s2a2w4k4q,1024x4096:16x128s8a4w4k2q,\
1024x4096:8x256s16a4w4q}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.draw --format=csv,noheader
python -m benchmarks.stream_probe --decoder --products "$PRODUCTS" --out "$OUT/stream-probe.json" > /tmp/stream-probe.log 2>&1
grep -v '^\[stream\]' /tmp/stream-probe.log | tail -30
