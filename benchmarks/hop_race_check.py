"""Experiment: wrong answers under concurrent load on the GPU, per way of handing tensors between models.

    python benchmarks/hop_race_check.py --repository /tmp/pi0_repo --seconds 60 --clients 16

Each config is its own server start: the runner hands its outputs to the next model on the host (the
default) or, with VLASERVE_DEVICE_HANDOFF=1, on the device. 16 closed-loop gRPC clients send the same
request; every answer is compared with that server's first (batch-1) answer. With --sequential N, first N
batch-1 requests one after another (after 5 to warm up): their p50 / p99 latency, each answer checked.
With --reference golden, the request is the export's golden sample (item 0), and every answer is compared
with the actions the export computed for it in-process instead of with the server's first answer.
Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from loadtest.reliability import Load, Reference, rel_error
from vlaserve.client import PolicyClient, make_request
from vlaserve.manifest import read_manifest
from vlaserve.model.parity import REL_TOLERANCE
from vlaserve.server import ServerOptions, TritonServer
from vlaserve.value_check import golden_reference

CONFIGS = {
    "host hand-off (the default)": {},
    "device hand-off": {"VLASERVE_DEVICE_HANDOFF": "1"},
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repository", required=True)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument(
        "--sequential",
        type=int,
        default=0,
        help="then this many batch-1 requests one after another: latency, each answer checked",
    )
    parser.add_argument(
        "--reference", choices=["first", "golden"], default="first",
        help="compare with the server's first answer, or with the export's golden sample (item 0) and the actions "
        "the export computed for it in-process",
    )  # fmt: skip
    parser.add_argument("--out", default="hop.json")
    args = parser.parse_args()
    rows, first = [], None
    tolerance = REL_TOLERANCE[read_manifest(Path(args.repository), "encoder").dtype]  # the export's parity
    for name in args.configs.split(","):
        for k in ("VLASERVE_DEVICE_HANDOFF", "VLASERVE_PAGEABLE_HANDOFF"):
            os.environ.pop(k, None)
        os.environ.update(CONFIGS[name])
        opts = ServerOptions(
            model_repository=Path(args.repository),
            http_port=0,
            grpc_port=0,
            metrics_port=0,
            workdir=Path(f"/tmp/hop_{len(rows)}"),
            ready_timeout=600,
        )
        t0 = time.time()
        with TritonServer(opts) as srv:
            ready = time.time() - t0
            if args.reference == "golden":
                request, ref_actions = golden_reference(Path(args.repository))
                first_vs_reference = rel_error(PolicyClient(srv.grpc_url).infer(request), ref_actions)
            else:
                request = make_request(1, views=2, seed=11, with_noise=True)
                ref_actions = PolicyClient(srv.grpc_url).infer(request)
                first_vs_reference = 0.0
            first = ref_actions if first is None else first
            client = PolicyClient(srv.grpc_url)
            for _ in range(5):  # warm-up
                client.infer(request)
            times, seq_wrong = [], 0
            for _ in range(args.sequential):
                t = time.perf_counter()
                actions = client.infer(request)
                times.append((time.perf_counter() - t) * 1000.0)
                seq_wrong += rel_error(actions, ref_actions) > tolerance
            with Load([("grpc", srv.grpc_url)] * args.clients, Reference(request, ref_actions, tolerance)) as load:
                time.sleep(args.seconds)
            counts = load.counts()
            errs = sorted({m for _, o, m in load.outcomes if o == "wrong"})
        row = {
            "config": name,
            "ready_s": round(ready, 1),
            "answers": counts["ok"] + counts["wrong"],
            "wrong": counts["wrong"],
            "errors": counts["permanent"] + counts["retryable"],
            "wrong_errors": errs[:3],
            "ref_vs_first": rel_error(ref_actions, first),
            "reference": args.reference,
            "first_vs_reference": first_vs_reference,
            "sequential": len(times),
            "sequential_wrong": int(seq_wrong),
            "p50_ms": float(np.percentile(times, 50)) if times else None,
            "p99_ms": float(np.percentile(times, 99)) if times else None,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(
        f"\n{'config':28} {'ready s':>8} {'answers':>8} {'wrong':>6} {'errors':>7}  {'batch-1 p50 / p99 ms':>20}  seq wrong"
    )
    for r in rows:
        lat = f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}" if r["p50_ms"] is not None else "-"
        print(
            f"{r['config']:28} {r['ready_s']:8.1f} {r['answers']:8d} {r['wrong']:6d} {r['errors']:7d}  {lat:>20}  "
            f"{r['sequential_wrong']}/{r['sequential']}  {r['wrong_errors'][:1]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
