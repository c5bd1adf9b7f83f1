#!/usr/bin/env bash
# Where pi0's encoder spends its graph's time, by kind of kernel: the encoder compiled as the `gpu` variant
# serves it, its CUDA graph at $BUCKETS (default 1,16) timed and profiled (benchmarks/profile_runtime.py:
# cuBLAS products, attention, Inductor's reductions and pointwise kernels, copies, the rest; the $TOP
# longest kernels, default 30). One device call:
#   export OUT=$OUT && bash benchmarks/gpu_encoder_profile.sh
cd "$(dirname "$0")/.."
export OUT=${OUT:-reports/gpu}
source benchmarks/gpu_pi0.sh
python benchmarks/profile_runtime.py --repository /tmp/pi0_repo --models encoder --buckets "${BUCKETS:-1,16}" \
  --compile --top "${TOP:-30}" --out "$OUT/profile-encoder.json" > /tmp/profile-encoder.log 2>&1
tail -6 /tmp/profile-encoder.log
python - "$OUT/profile-encoder.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1])):
    print(f"== bucket {r['batch']}: graph {r['graph_ms']} ms, busy {r['busy_ms']}, {r['kernels']} kernels")
    for name, ms, calls in r["top"][:30]:
        print(f"  {ms:8.3f} ms {calls:4d}x {name}")
PY
