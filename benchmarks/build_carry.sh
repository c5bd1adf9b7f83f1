#!/usr/bin/env bash
# Build .carry/ (git-ignored) for the GPU machine, which has no network: the packages the project needs
# beyond that machine's image (numpy 1.26 for the Python-backend stub, tritonclient and its needs,
# Locust and its needs) for CPython 3.12, and the tritonserver of the pinned nvidia-pytriton wheel
# trimmed to what serving needs (the binary, its libraries, the Python backend and the 3.12 stub;
# no bundled libpython). benchmarks/gpu_env.sh unpacks both there. Run here, after `make venv`:
#   bash benchmarks/build_carry.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "build_carry: error: no .venv (run make venv first)" >&2; exit 2; }
pin() { grep -i -E "^$1(\[[^]]*\])?==" requirements-serve.txt | sed 's/\[.*\]//'; }
# Pinned by requirements-serve.txt, then what tritonclient and Locust need there, at the versions `make venv`
# resolved (read from .venv); packages the GPU image already has (requests, psutil, msgpack, jinja2,
# click, pyyaml, ...) stay out, to keep the carry under 64 MiB, the most a copy to that machine may take.
PACKAGES="$(pin numpy) $(pin tritonclient) $(pin protobuf) $(pin python-rapidjson) $(pin locust)"
# the openpi gateway and openpi's client, for benchmarks/gpu_gateway.sh (msgpack is the image's)
PACKAGES="$PACKAGES $(pin websockets) $(pin pillow) $(grep -E '^openpi-client==' requirements.txt | sed 's/ .*//')"
for dep in grpcio ml_dtypes gevent geventhttpclient greenlet zope.event zope.interface flask flask-cors flask-login \
           werkzeug itsdangerous blinker configargparse pyzmq python-socketio python-engineio bidict \
           simple-websocket wsproto brotli lazy-importer; do
  PACKAGES="$PACKAGES $dep==$($PY -c "import importlib.metadata as m; print(m.version('$dep'))")"
done
rm -rf .carry && mkdir -p .carry/site
echo "[carry] packages for CPython 3.12: $PACKAGES"
# Installed into a folder and packed with xz rather than carried as wheels: a third smaller.
$PY -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
  --target .carry/site $PACKAGES
tar -C .carry -cJf .carry/site-packages.tar.xz site && rm -rf .carry/site
SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "[carry] trimmed tritonserver from $SITE (xz, a minute) ..."
tar -C "$SITE" -cJf .carry/tritonserver-trim.tar.xz --transform 's,^,trim/,' --exclude 'libpython3*' \
  pytriton/tritonserver/bin pytriton/tritonserver/backends pytriton/tritonserver/python_backend_stubs/3.12 \
  nvidia_pytriton.libs
du -sh .carry/site-packages.tar.xz .carry/tritonserver-trim.tar.xz .carry
