#!/usr/bin/env bash
# The MPS sidecar: run the NVIDIA MPS control daemon in the foreground, apply default limits, and
# quit it cleanly on SIGTERM/SIGINT. The same script runs in the container and natively
# (`make serve MPS=1`, or `python -m vlaserve.server --mps`). One daemon serves every GPU the container or
# host makes visible; each client's thread percentage holds on the GPU it runs on.
#
# Environment:
#   CUDA_MPS_PIPE_DIRECTORY          pipe directory shared with the clients (default /tmp/nvidia-mps)
#   CUDA_MPS_LOG_DIRECTORY           daemon logs (default /tmp/nvidia-log)
#   MPS_ACTIVE_THREAD_PERCENTAGE     default ceiling for every client, 1-100 (default 100)
#   MPS_PINNED_DEVICE_MEM_LIMIT      default pinned device memory limits, per GPU: "0=40G" or "0=40G,1=40G"
#                                    (default: none)
set -euo pipefail

export CUDA_MPS_PIPE_DIRECTORY="${CUDA_MPS_PIPE_DIRECTORY:-/tmp/nvidia-mps}"
export CUDA_MPS_LOG_DIRECTORY="${CUDA_MPS_LOG_DIRECTORY:-/tmp/nvidia-log}"
percentage="${MPS_ACTIVE_THREAD_PERCENTAGE:-100}"
pinned="${MPS_PINNED_DEVICE_MEM_LIMIT:-}"

fail() { echo "mps: error: $*" >&2; exit 1; }

[[ "$percentage" =~ ^[0-9]+$ ]] && (( percentage >= 1 && percentage <= 100 )) ||
  fail "MPS_ACTIVE_THREAD_PERCENTAGE: got '$percentage', expected an integer in 1..100"
if [[ -n "$pinned" && ! "$pinned" =~ ^[0-9]+=[0-9]+[MG](,[0-9]+=[0-9]+[MG])*$ ]]; then
  fail "MPS_PINNED_DEVICE_MEM_LIMIT: got '$pinned', expected <device>=<size>[M|G] per GPU, e.g. 0=40G or 0=40G,1=40G"
fi
command -v nvidia-cuda-mps-control >/dev/null 2>&1 ||
  fail "nvidia-cuda-mps-control not found: MPS needs an NVIDIA driver with MPS on this host (is this a GPU host, and is the driver's bin directory on PATH?)"
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"

control() { echo "$*" | nvidia-cuda-mps-control; }

nvidia-cuda-mps-control -f &
daemon=$!
stop() {
  echo "mps: quitting the control daemon"
  control quit || true
  wait "$daemon" || true
  exit 0
}
trap stop TERM INT

for _ in $(seq 1 50); do  # the daemon answers once its control pipe exists
  control get_server_list >/dev/null 2>&1 && break
  kill -0 "$daemon" 2>/dev/null || fail "nvidia-cuda-mps-control exited at start (see $CUDA_MPS_LOG_DIRECTORY/control.log)"
  sleep 0.1
done
control get_server_list >/dev/null 2>&1 || fail "the MPS control daemon did not answer in 5 s"
control set_default_active_thread_percentage "$percentage" >/dev/null
IFS=, read -ra limits <<<"$pinned"
for limit in "${limits[@]}"; do control set_default_device_pinned_mem_limit "${limit%%=*}" "${limit#*=}" >/dev/null; done
gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
echo "mps: ready (pipes $CUDA_MPS_PIPE_DIRECTORY, ${gpus:-?} GPU(s) visible, default active thread percentage $percentage${pinned:+, pinned memory $pinned})"
wait "$daemon"
