#!/usr/bin/env bash
# The CPU form's base image, built on this host: where no container registry is reachable, a Debian
# bookworm root filesystem made by debootstrap and imported with `docker import` stands in for NVIDIA's
# Triton image. It has Python 3.11 with its shared library (the Python-backend stub links to it), pip,
# and what the host trusts:
#   - the host's CA bundle (HTTPS to the package index may be intercepted by a proxy the host trusts);
#   - the torch CPU wheel pinned in requirements-serve.txt, for bookworm's CPython 3.11, in /opt/wheels:
#     taken from wherever the host's pip finds it, or from TORCH_INDEX if set (on a host with only PyPI:
#     TORCH_INDEX=https://download.pytorch.org/whl/cpu, or pip would fetch torch's multi-GB CUDA build).
# Usage: deploy/cpu/base-image.sh [IMAGE]   (default vlaserve-base:bookworm; kept if it exists)
set -euo pipefail
cd "$(dirname "$0")/../.."
image="${1:-vlaserve-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
python="${PYTHON:-python3}"

if docker image inspect "$image" >/dev/null 2>&1; then
  echo "[base] $image exists (docker rmi it to rebuild)"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "[base] error: debootstrap not found (apt-get install debootstrap)" >&2; exit 1; }
torch_pin=$(grep -E "^torch==" requirements-serve.txt) || { echo "[base] error: no torch== pin in requirements-serve.txt" >&2; exit 1; }

root=$(mktemp -d /var/tmp/vlaserve-rootfs.XXXXXX)
trap 'rm -rf "$root" "$root.log"' EXIT
start=$SECONDS
echo "[base] debootstrap bookworm into $root (about 3 minutes) ..."
debootstrap --variant=minbase --include=python3,libpython3.11,python3-pip,python3-venv,ca-certificates,procps \
  bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
echo "[base] $torch_pin (CPU build) into /opt/wheels ..."
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$torch_pin" -d "$root/opt/wheels"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
echo "[base] docker import as $image ..."
tar -C "$root" -c . | docker import \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'ENV PIP_FIND_LINKS=/opt/wheels' \
  --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
  --change 'ENV PIP_DISABLE_PIP_VERSION_CHECK=1' \
  --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "[base] $image built in $((SECONDS - start)) s"
