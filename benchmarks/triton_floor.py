"""The floor of one request through Triton: what a batch-1 request costs when the model does no work, or only spins.

A Python-backend model named and shaped as the policy (vlaserve.interface: the request's inputs and the
actions output, dynamic batching up to 16) is served by the same tritonserver as vlaserve; it answers
zeros. Each mode sends ``--requests`` batch-1 requests one after another (after 20 to warm up) and
reports the client's p50 / p99 and Triton's own per-request figures from its metrics (queue, input,
infer, output, as served_breakdown reads them):

- ``grpc`` and ``http`` (Triton's own HTTP, not through vlaserve's guard): the request's tensors in the
  message, as ``vlaserve.client`` sends them;
- ``grpc_shm``: the inputs in a system shared-memory region, as ``PolicyClient(shared_memory=True)`` sends
  them (registered once, written per request; the message carries only their place; one host);
- with ``--read``, the model also reads every input as the runner does (``as_numpy``), else it reads none;
- with ``--work-ms N``, each execute spins for N ms before it answers, as the runner's instance spins in the
  CUDA stream's synchronize while its graphs run: the floor of a model that takes that long, whose server and
  client threads sit idle meanwhile (a model that answers at once keeps them busy);
- with ``--busy-cpus N``, N processes spin at the lowest priority (nice 19) through the requests, so that N
  CPUs never go idle: whether what a long execute adds is the time idle CPUs take to wake.

Whatever the real model adds over this floor is its own instance's work and its compute. No GPU is used.

    python -m benchmarks.triton_floor --views 2 --requests 500 --out reports/triton-floor.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.served_breakdown import per_model, percentile
from loadtest import metrics
from vlaserve import interface as io
from vlaserve.client import PolicyClient, make_request
from vlaserve.server import ServerOptions, TritonServer

MODEL = io.POLICY  # in the place of the policy, as the server expects it
MODES = ("grpc", "http", "grpc_shm")

MODEL_PY = """
import time

import numpy as np
import triton_python_backend_utils as pb_utils

READ = {read}
WORK_S = {work_s!r}


class TritonPythonModel:
    def execute(self, requests):
        until = time.perf_counter() + WORK_S
        while time.perf_counter() < until:  # spins, as a CUDA stream's synchronize does while the GPU works
            pass
        responses = []
        for request in requests:
            batch = 1
            if READ:
                arrays = [t.as_numpy() for t in request.inputs()]
                batch = len(arrays[0])
            actions = np.zeros((batch, {horizon}, {dim}), dtype=np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("{actions}", actions)]))
        return responses
"""


def triton_type(array: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(array.dtype)


def write_repository(root: Path, views: int, read: bool, work_ms: float = 0.0) -> Path:
    """A repository of one model, named as the policy, with its request inputs and its actions output; each
    execute spins for ``work_ms`` before it answers."""
    request = make_request(views=views, with_noise=True)
    lines = [f'name: "{MODEL}"', 'backend: "python"', "max_batch_size: 16", "dynamic_batching { }"]
    for name, array in request.items():
        optional = " optional: true" if name == io.NOISE else ""
        dims = ", ".join(str(d) for d in array.shape[1:])
        lines.append(f'input {{ name: "{name}" data_type: TYPE_{triton_type(array)} dims: [ {dims} ]{optional} }}')
    lines.append(
        f'output {{ name: "{io.ACTIONS}" data_type: TYPE_FP32 dims: [ {io.ACTION_HORIZON}, {io.ACTION_DIM} ] }}'
    )
    lines.append("instance_group { kind: KIND_CPU count: 1 }")
    model = root / MODEL
    (model / "1").mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text("\n".join(lines) + "\n")
    (model / "1" / "model.py").write_text(
        MODEL_PY.format(
            read=read, work_s=work_ms / 1e3, horizon=io.ACTION_HORIZON, dim=io.ACTION_DIM, actions=io.ACTIONS
        )
    )
    return root


def measure(server: TritonServer, mode: str, request: dict, requests: int) -> dict:
    """``requests`` batch-1 requests one after another over ``mode``, after 20 to warm up."""
    protocol = "http" if mode == "http" else "grpc"
    url = server.grpc_url if protocol == "grpc" else server.triton_http
    shared = mode == "grpc_shm"
    with PolicyClient(url, protocol, model=MODEL, shared_memory=shared, admin_key=server.options.admin_key) as client:
        times, before = [], None
        for i in range(20 + requests):
            if i == 20:
                before = metrics.scrape(server.metrics_url)
            start = time.perf_counter()
            actions = client.infer(request)
            if i >= 20:
                times.append((time.perf_counter() - start) * 1e3)
            if actions.shape != (1, io.ACTION_HORIZON, io.ACTION_DIM):
                raise SystemExit(f"triton_floor: {mode}: actions of shape {actions.shape}")
        triton = per_model(before, metrics.scrape(server.metrics_url))[MODEL]
        return {"mode": mode, "p50_ms": percentile(times, 0.5), "p99_ms": percentile(times, 0.99),
                "mean_ms": round(statistics.fmean(times), 3), **triton}  # fmt: skip


# Spins at the lowest priority until its parent (the benchmark) is gone, however that one ended.
SPINNER = """
import os
import sys

os.nice(19)
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(100_000):
        pass
"""


@contextlib.contextmanager
def busy_cpus(count: int):
    """``count`` processes that spin at the lowest priority while the block runs (none for 0)."""
    spinners = []
    try:
        for _ in range(count):
            spinners.append(subprocess.Popen([sys.executable, "-c", SPINNER, str(os.getpid())]))
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--views", type=int, default=2, help="camera views per request (default 2)")
    parser.add_argument("--requests", type=int, default=500, help="timed requests per mode (default 500)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {','.join(MODES)}")
    parser.add_argument("--read", action="store_true", help="the model reads every input (as_numpy)")
    parser.add_argument(
        "--work-ms",
        type=float,
        default=0.0,
        help="each execute spins this long before it answers (default 0: answers at once)",
    )
    parser.add_argument(
        "--busy-cpus",
        type=int,
        default=0,
        help="processes spinning at nice 19 through the requests (default 0; at most the CPU count)",
    )
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    args = parser.parse_args(argv)
    cpus = os.cpu_count() or 1
    if not 0 <= args.busy_cpus <= cpus:
        parser.error(f"--busy-cpus: {args.busy_cpus}; 0 to this machine's {cpus} CPUs")
    if not 0 <= args.work_ms <= 1000:
        parser.error(f"--work-ms: {args.work_ms}; 0 to 1000")
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {','.join(MODES)}")
    if not 1 <= args.views <= io.MAX_VIEWS:
        parser.error(f"--views: {args.views}; 1 to {io.MAX_VIEWS}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    request = make_request(views=args.views)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vlaserve-floor-") as tmp:
        repo = write_repository(Path(tmp) / "repo", args.views, args.read, args.work_ms)
        options = ServerOptions(model_repository=repo, http_port=0, grpc_port=0, metrics_port=0,
                                workdir=Path(tmp) / "work", http_guard=False)  # fmt: skip
        what = f"spins {args.work_ms:g} ms" if args.work_ms else "does no work"
        busy = f", {args.busy_cpus} CPUs kept busy" if args.busy_cpus else ""
        print(f"[floor] serving a model that {what} ({'reads its inputs' if args.read else 'reads nothing'}{busy})")
        with TritonServer(options) as server, busy_cpus(args.busy_cpus):
            for mode in args.modes:
                rows.append(measure(server, mode, request, args.requests))
                print(f"[floor] {mode}: p50 {rows[-1]['p50_ms']} ms, p99 {rows[-1]['p99_ms']} ms", flush=True)
    result = {"date": datetime.date.today().isoformat(), "host": platform.node(), "views": args.views,
              "read": args.read, "work_ms": args.work_ms, "busy_cpus": args.busy_cpus, "requests": args.requests,
              "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| mode | client p50 / p99 ms | Triton queue / input / infer / output ms |")
    print("|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['p50_ms']} / {r['p99_ms']} | {r['queue']} / {r['input']} / {r['infer']} / {r['output']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
