#!/usr/bin/env bash
# Build .carry-lerobot/ (git-ignored) for the GPU machine, which has no network: LeRobot 0.4.4 and the
# transformers 4.53.2 that openpi's pi0 patches (the patch applied, as `make lerobot-venv` applies it), with
# what they import that the GPU image lacks or holds at another version, for CPython 3.12. The versions are
# tests/lerobot's pins, and for the rest those `make lerobot-venv` resolved (read from .venv-lerobot).
# Packages the image has at versions that work (torch, numpy, pyarrow, pandas, accelerate, einops, imageio,
# safetensors, regex, ...) stay out. benchmarks/gpu_lerobot_peer.sh unpacks it there. Run here:
#   make lerobot-venv && bash benchmarks/build_lerobot_carry.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
LEROBOT_PY=.venv-lerobot/bin/python
[ -x "$LEROBOT_PY" ] || { echo "build_lerobot_carry: error: no .venv-lerobot (run make lerobot-venv first)" >&2; exit 2; }
pin() { grep -h -i -E "^$1==" tests/lerobot/requirements.txt tests/lerobot/requirements-nodeps.txt; }
PACKAGES="$(pin transformers) $(pin huggingface_hub) $(pin draccus) $(pin datasets) $(pin deepdiff) $(pin pyserial) $(pin lerobot)"
# transformers 4.53.2 needs tokenizers below 0.22 (the image has 0.23); the rest is what LeRobot's modules
# import on the way to its pi0 (its datasets, motors and config code) and the image does not have
for dep in tokenizers dill multiprocess orderly-set pydantic pydantic_core annotated-types typing-inspection \
           cachebox mergedeep pyyaml-include toml; do
  PACKAGES="$PACKAGES $dep==$($LEROBOT_PY -c "import importlib.metadata as m; print(m.version('$dep'))")"
done
rm -rf .carry-lerobot && mkdir -p .carry-lerobot/site
echo "[carry-lerobot] packages for CPython 3.12: $PACKAGES"
$PY -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
  --target .carry-lerobot/site $PACKAGES
(cd .carry-lerobot/site && GIT_DIR=/nonexistent git apply --whitespace=nowarn -p1 "$OLDPWD/tests/lerobot/transformers-4.53.2-openpi.patch")
tar -C .carry-lerobot -cJf .carry-lerobot/site-packages.tar.xz site && rm -rf .carry-lerobot/site
du -sh .carry-lerobot/site-packages.tar.xz
