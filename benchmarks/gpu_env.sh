#!/usr/bin/env bash
# Source this on the GPU machine (no network): a virtualenv with numpy 1.26 in front of the image's
# own packages (torch with CUDA), the carried packages (.carry/site-packages.tar.xz) and the trimmed
# tritonserver of the nvidia-pytriton wheel (.carry/tritonserver-trim.tar.xz), both made here by
# benchmarks/build_carry.sh. numpy 1.26 because the Python-backend stub of nvidia-pytriton 0.7.0
# silently zeroes every tensor under numpy 2 (deploy/README.md).
# Idempotent: a second source on the same machine only sets the environment.
set -e
VENV=${VENV:-/tmp/venv}
IMAGE_SITE=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  tar -C "$SITE" --strip-components=1 -xJf .carry/site-packages.tar.xz
  printf '#!/bin/sh\nexec "%s" -m locust "$@"\n' "$VENV/bin/python" > "$VENV/bin/locust" && chmod +x "$VENV/bin/locust"
  echo "$IMAGE_SITE" > "$SITE/zz_image_site.pth"   # after the venv's own numpy 1.26
  echo "$PWD" > "$SITE/vlaserve.pth"
fi
# the server is left out of a call that serves nothing (carry .carry/site-packages.tar.xz alone); a later call
# on the same warm machine that carries it unpacks it then
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -f .carry/tritonserver-trim.tar.xz ] && [ ! -f "$SITE/.tritonserver-unpacked" ]; then
  tar -C "$SITE" --strip-components=1 -xJf .carry/tritonserver-trim.tar.xz && touch "$SITE/.tritonserver-unpacked"
fi
export PATH="$VENV/bin:$PATH" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PATH="$PATH:/usr/local/nvidia/bin"
set +e
