# Sourced by the benchmarks/gpu_*.sh runs: the GPU machine's environment (benchmarks/gpu_env.sh), $OUT
# (default reports/gpu), and the pi0 export (bf16, 2 views, the `gpu` variant, golden samples) in
# /tmp/pi0_repo, made unless an earlier run on the same machine left it there.
source benchmarks/gpu_env.sh
OUT=${OUT:-reports/gpu} && mkdir -p "$OUT"

# export_pi0 REPO LOG [EXPORT FLAGS...]: pi0 exported as above into REPO (with any more flags), its log in LOG,
# unless an earlier run on the same machine left it there.
export_pi0() {
  local repo=$1 log=$2
  shift 2
  mkdir -p "$repo" && cp model_repository/spec.yaml "$repo/"
  if [ ! -f "$repo/decoder/1/golden.pt" ]; then
    python -m export --preset pi0 --views 2 --dtype bf16 --variant gpu --device cuda --repository "$repo" "$@" \
      > "$log" 2>&1 || { tail -20 "$log"; exit 1; }
    grep -E "done in" "$log"
  fi
}
export_pi0 /tmp/pi0_repo "$OUT/export.log"
