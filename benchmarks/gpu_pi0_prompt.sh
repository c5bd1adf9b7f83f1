# Sourced after benchmarks/gpu_pi0.sh by the prompt-position runs: pi0 exported as gpu_pi0.sh does but for
# the first $PROMPT prompt positions only (default 24; `python -m export --prompt-tokens`), into $R
# (/tmp/pi0_p$PROMPT), made unless an earlier run on the same machine left it there (its log in /tmp).
P=${PROMPT:-24}
R=/tmp/pi0_p$P
export_pi0 "$R" "/tmp/export-p$P.log" --prompt-tokens "$P"
