#!/usr/bin/env bash
# One device call: Nsight Compute's counters for one launch of the decoder's attention kernel
# (vlaserve.model.kernels.triton_attention, as benchmarks/attention_bench.py runs it) at batch 1 and 16,
# to say where its time goes: at batch 1 one 16-row block over 128 keys takes about 11 us, several times
# what its loads and products need (docs/BENCHMARKS.md). The clocks are left alone (--clock-control none).
# Nsight Compute read the counters on the Firecracker machines of this GPU kind, not on the gVisor ones: a
# run there says "LibraryNotLoaded" and ends.
# It serves nothing: carry .carry/site-packages.tar.xz alone (room for .carry-lerobot in the same call).
#   bash benchmarks/gpu_ncu_attention.sh
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
OUT=${OUT:-reports/gpu} && mkdir -p "$OUT"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
[ -n "$NCU" ] || { echo "no ncu on this machine"; exit 1; }
for batch in ${BATCHES:-1 16}; do
  # the 6th launch: the eager warm-up's, after Triton's compile and with the keys of earlier layers in L2
  "$NCU" --clock-control none --kernel-name regex:_attention_kernel --launch-skip 5 --launch-count 1 \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis \
    python -m benchmarks.attention_bench --batches "$batch" --impls triton_attention \
    --out "$OUT/ncu-attention-b$batch.json" > "$OUT/ncu-attention-b$batch.txt" 2>&1
  echo "== batch $batch (full report: $OUT/ncu-attention-b$batch.txt)"
  grep -iE "stalled|Duration|Grid Size|Registers Per|Achieved Occupancy|Memory Throughput|Compute \(SM\) Throughput|Stall|Warp Cycles Per Issued|Issued Warp" \
    "$OUT/ncu-attention-b$batch.txt" | head -30
done
