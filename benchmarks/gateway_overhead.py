"""The gateway's cost: a robot's observation through vlaserve.gateway (openpi's client) against the same request
sent straight to Triton over gRPC (tritonclient), one at a time and under closed-loop load.

Serves the exported repository (``--repository``, as it is, or its ``--variant``) with the embedded
tritonserver, starts the gateway in front of it for ``--robot``, and for each path: ``--requests`` requests
one after another (after 5 to warm up), then ``--clients`` closed-loop clients for ``--seconds``. The
observation carries its own noise, so every answer is checked against the actions the exported model
computes for it in-process (eager PyTorch with the export's weights, on the export's device), within the
export's parity tolerance for its dtype; a wrong answer is counted, and a row with one is void. Prints a
table last.

    python -m benchmarks.gateway_overhead --repository model_repository --out reports/gateway.json
    python -m benchmarks.gateway_overhead --repository /tmp/pi0_repo --variant gpu_one_model --out ...
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks.peers import latencies
from vlaserve.client import PolicyClient
from vlaserve.manifest import read_manifest
from vlaserve.model.parity import REL_TOLERANCE
from vlaserve.robots import NOISE_KEY, RobotTransform
from vlaserve.server import ServerOptions, TritonServer, free_port, variant_server
from vlaserve.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "model_repository" / "spec.yaml"


def observation(seed: int) -> dict:
    """A DROID-like observation: a 180 x 320 exterior frame (resized by the gateway), a 224 wrist frame."""
    rng = np.random.default_rng(seed)
    return {
        "observation/exterior_image_1_left": rng.integers(0, 255, (180, 320, 3), dtype=np.uint8),
        "observation/wrist_image_left": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
        "observation/joint_position": rng.normal(size=7),
        "observation/gripper_position": np.array([0.5]),
        "prompt": "pick up the cup",
        NOISE_KEY: rng.standard_normal((50, 32), dtype=np.float32),  # fixed: the answer can be checked
    }


def in_process_actions(repo: Path, request: dict) -> np.ndarray:
    """The actions the exported model computes for ``request`` in-process: eager PyTorch, the export's weights
    (its seed), dtype and device."""
    import torch

    from vlaserve.model.policy import build_policy
    from vlaserve.model.presets import get_preset
    from vlaserve.value_check import TORCH_DTYPE

    manifest = read_manifest(repo, "encoder")
    dtype = getattr(torch, TORCH_DTYPE[manifest.dtype])
    device = "cuda" if manifest.init_device == "cuda" else "cpu"
    policy = build_policy(
        get_preset(manifest.preset, manifest.views, manifest.prompt_tokens), manifest.seed, dtype, device
    )
    tensors = {k: torch.from_numpy(v).to(device) for k, v in request.items()}
    with torch.inference_mode():
        actions = policy(tensors["images"], tensors["tokens"], tensors["state"], tensors["noise"])
    del policy
    if device == "cuda":
        torch.cuda.empty_cache()
    return actions.float().cpu().numpy()


class Checked:
    """Counts answers, and those further than the tolerance from the in-process reference."""

    def __init__(self, reference: np.ndarray, tolerance: float):
        self.reference, self.tolerance = reference, tolerance
        self.answers, self.wrong, self.worst = 0, 0, 0.0
        self.lock = threading.Lock()

    def __call__(self, actions: np.ndarray) -> None:
        actions = np.asarray(actions, dtype=np.float64).reshape(self.reference.shape)
        rel = float(np.linalg.norm(actions - self.reference) / np.linalg.norm(self.reference))
        with self.lock:
            self.answers += 1
            self.worst = max(self.worst, rel if np.isfinite(rel) else float("inf"))
            self.wrong += not rel <= self.tolerance


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def measure(make_call, requests: int, clients: int, seconds: float) -> dict:
    times = latencies(make_call(), requests, warmup=5)
    row = {"p50_ms": round(statistics.median(times), 2), "p99_ms": round(percentile(times, 0.99), 2)}
    done, stop = [], threading.Event()

    def loop():
        own = make_call()
        while not stop.is_set():
            t0 = time.perf_counter()
            own()
            done.append((time.perf_counter() - t0) * 1e3)

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    row.update(clients=clients, per_s=round(len(done) / seconds, 1), load_p50_ms=round(percentile(done, 0.5), 1),
               load_p99_ms=round(percentile(done, 0.99), 1))  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", default="model_repository", help="an exported repository (make export)")
    parser.add_argument("--robot", default="droid")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--variant", help="serve this spec variant of the repository (default: as it is)")
    parser.add_argument("--rounds", type=int, default=1, help="measure both paths this many times, alternating")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from openpi_client import websocket_client_policy

    repo, workdir = Path(args.repository), Path("/tmp/gateway_overhead")
    if args.variant:
        spec = load_spec(repo / "spec.yaml", args.variant)
        server = variant_server(spec, repo, workdir / "repo", workdir, ready_timeout=900, cuda_memory_pool_mb=2048)
    else:
        server = TritonServer(ServerOptions(model_repository=repo, http_port=0, grpc_port=0, metrics_port=0,
                                            workdir=workdir, ready_timeout=600))  # fmt: skip
    with server.start():
        port = free_port()
        gateway = subprocess.Popen([sys.executable, "-m", "vlaserve.gateway", "--robot", args.robot, "--triton",
                                    server.grpc_url, "--port", str(port)], cwd=ROOT)  # fmt: skip
        try:
            for _ in range(300):
                try:
                    if urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200:
                        break
                except OSError:
                    time.sleep(0.2)
            robot = RobotTransform(
                args.robot, load_spec(SPEC).robots[args.robot], PolicyClient(server.grpc_url).views()
            )
            obs = observation(0)
            request = robot.request(obs)
            reference = in_process_actions(repo, request)
            tolerance = REL_TOLERANCE[read_manifest(repo, "encoder").dtype]
            direct_check = Checked(reference, tolerance)
            gateway_check = Checked(reference[0, :, : robot.settings.action_dim], tolerance)

            def direct():
                client = PolicyClient(server.grpc_url)
                return lambda: direct_check(client.infer(request))

            def through_gateway():
                client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)
                return lambda: gateway_check(client.infer(obs)["actions"])

            rows = {}
            for round_ in range(1, args.rounds + 1):  # the paths alternate: an order effect shows between rounds
                for name, make_call, check in (("direct gRPC (tritonclient)", direct, direct_check),
                                               ("gateway (openpi-client)", through_gateway, gateway_check)):  # fmt: skip
                    before = (check.answers, check.wrong)
                    row = measure(make_call, args.requests, args.clients, args.seconds)
                    row.update(answers=check.answers - before[0], wrong=check.wrong - before[1],
                               worst_rel=float(f"{check.worst:.3g}"))  # fmt: skip
                    rows[f"{name}, round {round_}" if args.rounds > 1 else name] = row
        finally:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(timeout=60)
    result = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "repository": args.repository, "variant": args.variant, "robot": args.robot,
              "tolerance": tolerance, "rows": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'path':38} {'batch-1 p50 / p99 ms':>20} | {'clients':>7} {'answers/s':>9} {'p50 / p99 ms':>14} | "
          f"wrong of answers (worst rel, tolerance {tolerance:g})")  # fmt: skip
    for name, r in rows.items():
        print(f"{name:38} {r['p50_ms']:9.2f} / {r['p99_ms']:7.2f} | {r['clients']:7d} {r['per_s']:9.1f} "
              f"{r['load_p50_ms']:6.1f} / {r['load_p99_ms']:6.1f} | {r['wrong']} of {r['answers']} ({r['worst_rel']:.2g})")  # fmt: skip


if __name__ == "__main__":
    main()
