"""``make demo``: the main job end to end on this machine, in a few minutes on two CPU cores.

export the tiny preset -> start the embedded tritonserver -> send requests over gRPC and HTTP ->
a short Locust sweep -> stop -> a compare of three repository variants -> tables and a report.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np

from export.cli import main as export_main
from loadtest import sweep
from vlaserve.client import PolicyClient, make_request
from vlaserve.server import ServerOptions, TritonServer


def say(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def send_requests(server: TritonServer) -> None:
    for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
        client = PolicyClient(url, protocol)
        for batch in (1, 4):
            request = make_request(batch, views=client.views(), seed=batch, with_noise=True)
            start = time.perf_counter()
            actions = client.infer(request)
            ms = (time.perf_counter() - start) * 1e3
            again = client.infer(request)
            print(
                f"  {protocol:4s} batch {batch}: actions {list(actions.shape)} in {ms:.1f} ms, "
                f"first {[round(float(x), 3) for x in actions[0, 0, :3]]}, same noise -> same actions: {np.array_equal(actions, again)}"
            )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0])
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--duration", type=int, default=6, help="seconds per load step (default: 6)")
    parser.add_argument("--out", help="report folder (default: reports/demo-<timestamp>)")
    args = parser.parse_args(argv)
    out = Path(args.out or Path("reports") / f"demo-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    started = time.perf_counter()

    say("1/5 export the tiny preset (2 views, fp32) to ONNX and TorchScript, with parity checks")
    if export_main(["--preset", "tiny", "--views", "2", "--dtype", "fp32", "--repository", args.repository]) != 0:
        return 1

    say("2/5 start tritonserver (the nvidia-pytriton wheel's) on free ports")
    options = ServerOptions(model_repository=Path(args.repository), http_port=0, grpc_port=0, metrics_port=0,
                            workdir=out / "server")  # fmt: skip
    with TritonServer(options) as server:
        print(f"  ready: grpc {server.grpc_url}, http {server.http_url}, metrics {server.metrics_url}")
        say("3/5 requests: camera-like frames, a state and a prompt -> actions [batch, 50, 32]")
        send_requests(server)
        say("4/5 a short Locust sweep (closed loop, HTTP): 1, 4 and 8 users")
        sweep_args = sweep.parse_args(["--users", "1,4,8", "--duration", str(args.duration), "--host", server.http_url,
                                       "--metrics-url", server.metrics_url, "--out", str(out / "sweep")])  # fmt: skip
        sweep.run(sweep_args)

    say("5/5 compare repository variants from the spec: naive, batching, batching_multi (4 and 16 users)")
    compare_args = sweep.parse_args(["--compare", "naive,batching,batching_multi", "--users", "4,16",
                                     "--duration", str(args.duration), "--repository", args.repository,
                                     "--out", str(out / "compare")])  # fmt: skip
    sweep.run(compare_args)
    say(
        f"done in {time.perf_counter() - started:.0f} s; reports under {out}/ (results.json, sweep.png, Locust CSV/HTML)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
