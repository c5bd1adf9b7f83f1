#!/usr/bin/env bash
# One device call, a few minutes: benchmarks/stream_probe.py, the decoder's chained products at batch 1 with
# each program's weights streamed into shared memory ahead across layers, against one launch a layer. It
# serves nothing: carry .carry/site-packages.tar.xz alone. PRODUCTS (comma-separated NxK:BNxBKsSa_Aw_W
# settings) replaces the default sweep.
#   bash benchmarks/gpu_stream_probe.sh
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
export OUT=${OUT:-reports/gpu} && mkdir -p "$OUT"
PRODUCTS=${PRODUCTS:-\
8192x1024:64x64s8a16w4,8192x1024:64x64s2a16w4,8192x1024:64x64s12a4w4,8192x1024:64x128s4a8w4,\
2560x1024:32x64s16a16w4,2560x1024:32x64s4a16w4,\
1024x2048:8x128s16a8w4,1024x2048:16x128s8a8w4,\
1024x4096:8x256s16a4w4,1024x4096:8x128s16a8w4}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.draw --format=csv,noheader
python -m benchmarks.stream_probe --decoder --products "$PRODUCTS" --out "$OUT/stream-probe.json" > /tmp/stream-probe.log 2>&1
grep -v '^\[stream\]' /tmp/stream-probe.log | tail -20
