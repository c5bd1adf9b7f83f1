#!/usr/bin/env bash
# The encoder of pi0 exported for all 48 prompt positions and for $PROMPT of them (default 24;
# benchmarks/gpu_pi0_prompt.sh), compiled as the `gpu` variant serves it, its CUDA graph at $BUCKETS
# (default 1,16) timed and profiled kernel by kernel (benchmarks/profile_runtime.py): where the shorter
# prefix saves time, and where it does not. One device call:
#   export OUT=$OUT && bash benchmarks/gpu_prompt_profile.sh
cd "$(dirname "$0")/.."
export OUT=${OUT:-reports/gpu}
source benchmarks/gpu_pi0.sh
source benchmarks/gpu_pi0_prompt.sh
for repo in /tmp/pi0_repo "$R"; do
  name=profile-$(basename "$repo")
  python benchmarks/profile_runtime.py --repository "$repo" --models encoder --buckets "${BUCKETS:-1,16}" \
    --compile --out "$OUT/$name.json" > "/tmp/$name.log" 2>&1
  echo "== $repo"; tail -3 "/tmp/$name.log"
done
python - "$OUT"/profile-pi0_*.json <<'PY'
import json, sys
for f in sys.argv[1:]:
    for r in json.load(open(f)):
        print(f.split("profile-")[-1][:-5], r["batch"], r["graph_ms"], r["kernels"], r["busy_ms"], r["top"][:5])
PY
