#!/usr/bin/env bash
# One device call: LeRobot's PI0Policy in-process at pi0's sizes, bf16, batch 1, its actions checked against
# the same weights in float32 (benchmarks/lerobot_peer.py), in the image's Python and torch with LeRobot 0.4.4
# and openpi's transformers from .carry-lerobot/ (benchmarks/build_lerobot_carry.sh). Carry .carry-lerobot
# (the main .carry is not needed). LEROBOT_ARGS replaces the script's defaults, e.g. "--compile --repeats 30"
# to also time LeRobot's torch.compile (its max-autotune mode: minutes of compiling).
#   bash benchmarks/gpu_lerobot_peer.sh
cd "$(dirname "$0")/.."
set -o pipefail
OUT=${OUT:-reports/gpu} && mkdir -p "$OUT"
SITE=/tmp/lerobot-carry
[ -d "$SITE/site" ] || { mkdir -p "$SITE" && tar -C "$SITE" -xJf .carry-lerobot/site-packages.tar.xz; } || exit 1
export PYTHONPATH="$SITE/site" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 benchmarks/lerobot_peer.py --device cuda --dtype bfloat16 ${LEROBOT_ARGS:---repeats 30} \
  --out "$OUT/lerobot.json" 2>&1 | tee "$OUT/lerobot.log" | grep -E "^\[lerobot\]|Error" || tail -20 "$OUT/lerobot.log"
