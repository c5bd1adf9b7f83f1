#!/usr/bin/env bash
# One device call: Nsight Compute's counters for one launch of each of the fused decoder's four product
# kernels (q/k/v, output projection, gate/up + GeGLU, down projection; vlaserve.model.kernels) at batch 1,
# as benchmarks/decoder_kernels.py runs the whole decoder, to say where their time goes: each takes 6-8 us,
# two to six times what reading its weights at the memory's bandwidth needs, and asking the L2 cache for
# the weights ahead of time made them only a few percent quicker (docs/BENCHMARKS.md). The clocks are left
# alone (--clock-control none). It serves nothing: carry .carry/site-packages.tar.xz alone.
#   bash benchmarks/gpu_ncu_decoder.sh
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
OUT=${OUT:-reports/gpu} && mkdir -p "$OUT"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
[ -n "$NCU" ] || { echo "no ncu on this machine"; exit 1; }
# the four kernels launch in this order in each layer: skip the benchmark's own first launch of each and 9
# layers of the graph capture's eager warm-up
"$NCU" --clock-control none --launch-skip 40 --launch-count 4 \
  --kernel-name "regex:_norm_qkv_kernel|_out_proj_kernel|_norm_geglu_kernel|_down_proj_kernel" \
  --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
  --section SchedulerStats --section MemoryWorkloadAnalysis \
  python -m benchmarks.decoder_kernels --batch 1 --kinds "" --out "$OUT/ncu-decoder.json" > "$OUT/ncu-decoder-b1.txt" 2>&1
echo "== batch 1 (full report: $OUT/ncu-decoder-b1.txt)"
grep -E "^  _|stalled|Duration|Grid Size|Registers Per|Achieved Occupancy|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Warp Cycles Per Issued|Issued Warp|L2 Hit Rate" \
  "$OUT/ncu-decoder-b1.txt" | head -80
