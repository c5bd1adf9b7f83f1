#!/usr/bin/env bash
# pi0 exported for all 48 prompt positions the request carries (/tmp/pi0_repo, benchmarks/gpu_pi0.sh) and for
# $PROMPT of them (default 24; `python -m export --prompt-tokens`), each model's CUDA graph timed rested and
# under sustained load by benchmarks/sustained_clock.py (its answers checked against that export's golden
# samples first): the encoders at bucket 16, then both models at bucket 1, then the decoders at 16, the two
# exports alternating (their JSON rows in $OUT, the logs in /tmp: a call brings back 8 files); a run starts
# only while $BUDGET seconds (default 330) since the first have not passed.
# One device call:
#   export OUT=$OUT && bash benchmarks/gpu_prompt_tokens.sh
cd "$(dirname "$0")/.."
export OUT=${OUT:-reports/gpu}
source benchmarks/gpu_pi0.sh
source benchmarks/gpu_pi0_prompt.sh
clock_runs clock "${BUDGET:-330}" 8 5 "encoder 16 pi0_repo" "encoder 16 pi0_p$P" "encoder,decoder 1 pi0_p$P" \
  "encoder,decoder 1 pi0_repo" "decoder 16 pi0_p$P" "decoder 16 pi0_repo"
nvidia-smi -i 0 --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader
