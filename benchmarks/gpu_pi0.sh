# Sourced by the benchmarks/gpu_*.sh runs: the GPU machine's environment (benchmarks/gpu_env.sh), $OUT
# (default reports/gpu), and the pi0 export (bf16, 2 views, the `gpu` variant, golden samples) in
# /tmp/pi0_repo, made unless an earlier run on the same machine left it there; and clock_runs, below.
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

# clock_runs PREFIX BUDGET SECONDS_AT_16 SECONDS_ELSE "MODELS BATCH REPO [LABEL FLAGS...]"...: each run by
# benchmarks/sustained_clock.py on /tmp/REPO (its answers checked against that export's golden samples first),
# back to back for SECONDS_AT_16 at bucket 16 and SECONDS_ELSE at others, with any FLAGS given to it; its JSON
# rows in $OUT/PREFIX-REPO-MODELS-bBATCH[-LABEL].json, its log in /tmp (a call brings back 8 files), its table
# printed. A run starts only while BUDGET seconds since the first have not passed.
clock_runs() {
  local prefix=$1 budget=$2 long=$3 short=$4 began=$SECONDS run name seconds
  shift 4
  for run in "$@"; do
    set -- $run
    if [ $((SECONDS - began)) -ge "$budget" ]; then echo "not run (out of time): $run"; continue; fi
    seconds=$([ "$2" = 16 ] && echo "$long" || echo "$short")
    name="$prefix-$3-${1/,/-}-b$2${4:+-$4}"
    python -m benchmarks.sustained_clock --repository "/tmp/$3" --models "$1" --batch "$2" --seconds "$seconds" \
      "${@:5}" --out "$OUT/$name.json" > "/tmp/$name.log" 2>&1
    echo "== $run ($((SECONDS - began)) s in)"; grep -A4 "^model" "/tmp/$name.log" || tail -5 "/tmp/$name.log"
  done
}
