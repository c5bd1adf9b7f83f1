#!/usr/bin/env bash
# Healthy when the MPS control daemon answers get_server_list on its pipe.
export CUDA_MPS_PIPE_DIRECTORY="${CUDA_MPS_PIPE_DIRECTORY:-/tmp/nvidia-mps}"
command -v nvidia-cuda-mps-control >/dev/null 2>&1 || { echo "mps: error: nvidia-cuda-mps-control not found" >&2; exit 1; }
echo get_server_list | timeout 5 nvidia-cuda-mps-control >/dev/null
