# Sourced by the benchmarks/gpu_*.sh runs: the GPU machine's environment (benchmarks/gpu_env.sh), $OUT
# (default reports/gpu), and the pi0 export (bf16, 2 views, the `gpu` variant, golden samples) in
# /tmp/pi0_repo, made unless an earlier run on the same machine left it there.
source benchmarks/gpu_env.sh
OUT=${OUT:-reports/gpu} && mkdir -p "$OUT"
mkdir -p /tmp/pi0_repo && cp model_repository/spec.yaml /tmp/pi0_repo/
if [ ! -f /tmp/pi0_repo/decoder/1/golden.pt ]; then
  python -m export --preset pi0 --views 2 --dtype bf16 --variant gpu --device cuda --repository /tmp/pi0_repo > $OUT/export.log 2>&1 || { tail -20 $OUT/export.log; exit 1; }
  grep -E "done in" $OUT/export.log
fi
