#!/usr/bin/env bash
# Puts the open pi0 runtime that benchmarks/realtime_vla_peer.py runs beside vlaserve into .peers/ (ignored
# by git, never committed; carried to a GPU machine without network with the run's carry).
#   bash benchmarks/get_peers.sh [SOURCE]
# SOURCE: where to clone realtime-vla from, a URL or a local git directory (default: its GitHub repository);
# COMMIT: which of its commits (default: 2e84bc1, the one docs/BENCHMARKS.md measured).
# Only the files the benchmark needs are checked out (the inference code and the licence).
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE=${1:-https://github.com/Dexmal/realtime-vla}
COMMIT=${2:-2e84bc1}
rm -rf .peers/realtime-vla
mkdir -p .peers
git clone --quiet --no-checkout "$SOURCE" .peers/realtime-vla
git -C .peers/realtime-vla checkout --quiet "$COMMIT" -- pi0_infer.py LICENSE
git -C .peers/realtime-vla update-ref HEAD "$(git -C .peers/realtime-vla rev-parse "$COMMIT")"
echo "[peers] realtime-vla $(git -C .peers/realtime-vla log --oneline -1) in .peers/realtime-vla"
