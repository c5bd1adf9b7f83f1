#!/bin/sh
# The triton container's entrypoint: the launcher, with the container's arguments after these.
# In NVIDIA's image, NVIDIA's own entrypoint wraps it (driver and CUDA compatibility checks, library
# paths) and the image's tritonserver serves; elsewhere (the CPU form) the nvidia-pytriton wheel's does.
set -e
if [ -x /opt/nvidia/nvidia_entrypoint.sh ]; then
  exec /opt/nvidia/nvidia_entrypoint.sh python3 -m vlaserve.server --tritonserver /opt/tritonserver/bin/tritonserver --workdir /tmp/vlaserve "$@"
fi
exec python3 -m vlaserve.server --workdir /tmp/vlaserve "$@"
