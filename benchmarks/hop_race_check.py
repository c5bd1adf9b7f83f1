"""Experiment: wrong answers under concurrent load on the GPU, per way of handing tensors between models.

    python benchmarks/hop_race_check.py --repository /tmp/pi0_repo --seconds 60 --clients 16

Each config is its own server start: the runner hands its outputs to the next model on the host (the
default) or, with VLASERVE_DEVICE_HANDOFF=1, on the device. 16 closed-loop gRPC clients send the same
request; every answer is compared with that server's first (batch-1) answer. Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from loadtest.reliability import Load, Reference, rel_error  # noqa: E402
from vlaserve.client import PolicyClient, make_request  # noqa: E402
from vlaserve.server import ServerOptions, TritonServer  # noqa: E402

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
    parser.add_argument("--out", default="hop.json")
    args = parser.parse_args()
    rows, first = [], None
    for name in args.configs.split(","):
        for k in ("VLASERVE_DEVICE_HANDOFF",):
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
            request = make_request(1, views=2, seed=11, with_noise=True)
            ref_actions = PolicyClient(srv.grpc_url).infer(request)
            first = ref_actions if first is None else first
            with Load([("grpc", srv.grpc_url)] * args.clients, Reference(request, ref_actions, 5e-2)) as load:
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
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"\n{'config':28} {'ready s':>8} {'answers':>8} {'wrong':>6} {'errors':>7}  ref vs first")
    for r in rows:
        print(
            f"{r['config']:28} {r['ready_s']:8.1f} {r['answers']:8d} {r['wrong']:6d} {r['errors']:7d}  "
            f"{r['ref_vs_first']:.2e} {r['wrong_errors'][:1]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
