"""MPS on the GPU: two instance groups of one model at 80 and 20 percent, through the sidecar.

    python benchmarks/mps_check.py --repository /tmp/tiny_gpu_repo --out $OUT/mps_check.json

Writes a variant of the repository whose encoder has two GPU instance groups (80 % and 20 %), starts
the server with ``--mps`` (deploy/mps/entrypoint.sh run natively), reads every instance's status (PID,
SM count, bf16 matmul rate measured at start), sends requests, stops everything, and checks that
no MPS daemon or stub process is left.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from vlaserve import repository
from vlaserve.client import PolicyClient, make_request
from vlaserve.server import variant_server


def processes(name_prefix: str) -> list[str]:
    """Processes whose name (not command line: ours mentions these names) starts with ``name_prefix``."""
    out = subprocess.run(["pgrep", "-a", f"^{name_prefix}"], capture_output=True, text=True).stdout
    return out.splitlines()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repository", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--percentages", default="80,20")
    args = parser.parse_args()
    src = Path(args.repository)
    percentages = [int(p) for p in args.percentages.split(",")]
    groups = [
        {"name": f"encoder_mps{p}", "count": 1, "kind": "gpu", "gpus": [0], "mps_thread_percentage": p}
        for p in percentages
    ]
    spec = repository.load_spec(src / "spec.yaml", "gpu").with_model("encoder", instance_groups=groups)
    result = {"percentages": percentages}
    with variant_server(spec, src, Path("/tmp/mps_check_repo"), Path("/tmp/mps_check")) as server:
        result["total_sms"] = server.sidecar.sm_counts
        client = PolicyClient(server.grpc_url)
        request = make_request(2, client.views(), seed=0, with_noise=True)
        result["actions_ok"] = bool(abs(client.infer(request)).mean() > 0)
        result["instances"] = [json.loads(p.read_text()) for p in sorted(server.status_dir.glob("*.json"))]
        servers = subprocess.run(["nvidia-cuda-mps-control"], input="get_server_list\n", capture_output=True, text=True,
                                 env={**__import__("os").environ, **server.sidecar.client_env()}).stdout  # fmt: skip
        result["mps_servers"] = servers.split()
    time.sleep(2)
    result["left_after_stop"] = (
        processes("nvidia-cuda-mps") + processes("triton_python_backend_stub") + processes("tritonserver")
    )
    for inst in result["instances"]:
        print(
            {
                k: inst.get(k)
                for k in ("instance", "pid", "mps_thread_percentage", "sm_count", "expected_sm_count", "probe_tflops")
            }
        )
    print("MPS servers while serving:", result["mps_servers"], " left after stop:", result["left_after_stop"])
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
