# Sourced after benchmarks/gpu_pi0.sh by the prompt-position runs: pi0 exported as gpu_pi0.sh does but for
# the first $PROMPT prompt positions only (default 24; `python -m export --prompt-tokens`), into $R
# (/tmp/pi0_p$PROMPT), made unless an earlier run on the same machine left it there (its log in /tmp).
P=${PROMPT:-24}
R=/tmp/pi0_p$P
mkdir -p "$R" && cp model_repository/spec.yaml "$R/"
if [ ! -f "$R/decoder/1/golden.pt" ]; then
  python -m export --preset pi0 --views 2 --dtype bf16 --prompt-tokens "$P" --variant gpu --device cuda \
    --repository "$R" > "/tmp/export-p$P.log" 2>&1 || { tail -20 "/tmp/export-p$P.log"; exit 1; }
  grep -E "done in" "/tmp/export-p$P.log"
fi
