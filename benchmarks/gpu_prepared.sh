#!/usr/bin/env bash
# One device call, about 3 minutes (first run on the H200 on 2026-12-02: docs/BENCHMARKS.md): the attention's
# key splits merged by a kernel of their own (the whole fused decoder at batch 1 and 4, every answer against
# eager PyTorch; and the attention alone), then benchmarks/persistent_probe.py (a kernel boundary against a
# grid-wide barrier). It serves nothing: carry .carry/site-packages.tar.xz alone.
#   bash benchmarks/gpu_prepared.sh
cd "$(dirname "$0")/.."
set -o pipefail
source benchmarks/gpu_env.sh
export OUT=${OUT:-reports/gpu} && mkdir -p "$OUT"
SCHEDULES=off MERGES=last,kernel BATCHES="1 4" bash benchmarks/gpu_ahead.sh > "$OUT/merge-decoder.log" 2>&1
python -m benchmarks.attention_bench --batches 1,4 --impls triton_attention,triton_merge_kernel,triton_no_merge \
  --out "$OUT/attention-merge.json" > "$OUT/attention-merge.log" 2>&1
python -m benchmarks.persistent_probe --out "$OUT/persistent-probe.json" > "$OUT/persistent-probe.log" 2>&1
echo "== the fused decoder, merge by the last split against a kernel of its own"
cat "$OUT/merge-decoder.log"
echo "== the attention alone (µs per call)"
tail -3 "$OUT/attention-merge.log"
echo "== a kernel boundary against a grid-wide barrier"
tail -5 "$OUT/persistent-probe.log"
