"""Where a request's time goes through Triton, one request at a time and under load, every answer checked.

For each spec variant (and each ``--env`` setting, one server start each), served through
``vlaserve.server.variant_server`` over the artifacts exported in ``--repository``:
- ``--requests`` batch-1 requests one after another over gRPC (after 5 to warm up; with ``--shm`` again with
  the inputs in system shared memory, vlaserve.client.PolicyClient): client p50 / p99,
  Triton's own per-model figures per request (queue, input, compute, output; the ensemble's request), and
  the instances' own per execute and model (vlaserve.runner.PHASES: read, launch, wait, answer);
- then, for each count in ``--clients``, that many closed-loop gRPC clients for ``--seconds``: right answers
  per second, their p50 / p99, wrong answers and errors, and the batch each model formed on average.
The request is the export's golden sample (item 0); every answer is compared with the actions the export
computed for it in-process (over the export's parity tolerance: wrong). Prints a table last.

    python -m benchmarks.served_breakdown --repository /tmp/pi0_repo --variants gpu,gpu_unfused \\
        --requests 200 --clients 16,64 --seconds 20 --out $OUT/served.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import statistics
import time
from pathlib import Path

from loadtest import metrics
from loadtest.reliability import Load, Reference, rel_error
from vlaserve import interface as io
from vlaserve.client import PolicyClient
from vlaserve.manifest import read_manifest
from vlaserve.model.parity import REL_TOLERANCE
from vlaserve.runner import EXECUTES_SUFFIX, read_executes
from vlaserve.server import variant_server
from vlaserve.spec import load_spec
from vlaserve.value_check import golden_reference

SPEC = Path(__file__).resolve().parents[1] / "model_repository" / "spec.yaml"
MODELS = tuple(step.model for step in io.PIPELINE)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 2) if values else float("nan")


def per_model(before: dict, after: dict) -> dict:
    """Per model and request (loadtest.metrics.deltas): queue, input, infer, output and whole
    request ms, and the average batch."""
    models = metrics.deltas(before, after)["models"]
    keys = {
        "queue": "queue_ms",
        "input": "input_ms",
        "infer": "infer_ms",
        "output": "output_ms",
        "request": "request_ms",
    }
    return {
        model: {
            **{k: round(models[model][m], 2) for k, m in keys.items()},
            "batch": round(models[model]["avg_batch_size"], 2),
        }
        for model in (*MODELS, io.POLICY)
        if model in models  # a policy run as one model (spec pipeline one_model) has no step models
    }


def execute_sums(server) -> dict[str, collections.Counter]:
    """Per model, its instances' executes and their phases' summed ms (vlaserve.runner.PHASES), from each
    instance's executes file (its model named in its status file)."""
    per_model: dict[str, collections.Counter] = {}
    for path in server.status_dir.glob(f"*{EXECUTES_SUFFIX}"):
        status = path.with_name(path.name[: -len(EXECUTES_SUFFIX)] + ".json")
        model = json.loads(status.read_text()).get("model", path.stem) if status.is_file() else path.stem
        per_model.setdefault(model, collections.Counter()).update(read_executes(path))
    return per_model


def execute_phases(before: dict, after: dict) -> dict:
    """Per model and execute, ms of each phase between two :func:`execute_sums`."""
    out = {}
    for model, end in after.items():
        start = before.get(model, collections.Counter())
        count = end["count"] - start["count"]
        out[model] = {"executes": count, **{k: round((end[k] - start[k]) / count, 3) if count else None
                                            for k in end if k.endswith("_ms")}}  # fmt: skip
    return out


def shown(figures: dict) -> list[str]:
    """The models a row's table shows: the steps, or the policy run as one model."""
    return [m for m in MODELS if m in figures] or [io.POLICY]


def sequential(server, client: PolicyClient, request: dict, reference, tolerance: float, requests: int) -> dict:
    """``requests`` batch-1 requests one after another (after 5 to warm up), every answer checked."""
    for _ in range(5):
        client.infer(request)
    before, sums = metrics.scrape(server.metrics_url), execute_sums(server)
    latencies, errors = [], []
    for _ in range(requests):
        t0 = time.perf_counter()
        actions = client.infer(request)
        latencies.append((time.perf_counter() - t0) * 1e3)
        errors.append(rel_error(actions, reference))
    after, sums_after = metrics.scrape(server.metrics_url), execute_sums(server)
    wrong = sum(not e <= tolerance for e in errors)
    return {"requests": requests, "wrong": wrong, "p50_ms": percentile(latencies, 0.5),
            "rel_median": float(f"{statistics.median(errors):.3g}"), "rel_max": float(f"{max(errors):.3g}"),
            "p99_ms": percentile(latencies, 0.99), **per_model(before, after),
            "instance_phases": execute_phases(sums, sums_after)}  # fmt: skip


def run_config(args, variant: str, env: str, workdir: Path) -> dict:
    settings = dict(kv.split("=", 1) for kv in env.split(",") if kv)
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    repo = Path(args.repository)
    row = {"variant": variant, "env": env or "(default)"}
    shutil.rmtree(workdir, ignore_errors=True)  # each start from scratch: no model of an earlier variant stays
    try:
        server = variant_server(load_spec(SPEC, variant), repo, workdir / "repo", workdir / "work",
                                cuda_memory_pool_mb=2048, ready_timeout=600)  # fmt: skip
        started = time.perf_counter()
        with server:
            row["ready_s"] = round(time.perf_counter() - started, 1)
            # what each instance did at start: compile check, the graph choice per bucket, replay times
            row["instances"] = [json.loads(p.read_text()) for p in sorted(server.status_dir.glob("*.json"))]
            request, reference = golden_reference(repo)
            tolerance = REL_TOLERANCE[read_manifest(repo, io.ENCODER).dtype]
            row["sequential"] = sequential(server, PolicyClient(server.grpc_url), request, reference, tolerance,
                                           args.requests)  # fmt: skip
            if args.shm:
                with PolicyClient(server.grpc_url, shared_memory=True, admin_key=server.options.admin_key) as client:
                    row["sequential_shm"] = sequential(server, client, request, reference, tolerance, args.requests)
            for clients in [int(c) for c in args.clients.split(",") if c]:
                before = metrics.scrape(server.metrics_url)
                with Load([("grpc", server.grpc_url)] * clients, Reference(request, reference, tolerance)) as load:
                    start = time.time()
                    time.sleep(args.seconds)
                    end = time.time()
                after = metrics.scrape(server.metrics_url)
                # requests started within the window (the clients' last requests finish after it)
                counts = collections.Counter(o for t, o, _ in load.outcomes if start <= t < end)
                ms = [s * 1e3 for t, s in load.latencies if start <= t < end]
                row[f"clients_{clients}"] = {
                    "right_per_s": round(counts["ok"] / args.seconds, 1), "wrong": counts["wrong"],
                    "errors": counts["permanent"] + counts["retryable"], "p50_ms": percentile(ms, 0.5),
                    "p99_ms": percentile(ms, 0.99), **per_model(before, after),
                }  # fmt: skip
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", required=True, help="the exported artifacts (make export)")
    parser.add_argument("--variants", default="gpu", help="spec variants to serve, comma-separated")
    parser.add_argument("--env", action="append", default=None,
                        help='KEY=VALUE[,KEY=VALUE] for one server start per variant; repeat for more ("" = as it is)')  # fmt: skip
    parser.add_argument("--requests", type=int, default=200, help="batch-1 requests one after another")
    parser.add_argument("--shm", action="store_true",
                        help="the batch-1 requests again with their inputs in system shared memory (gRPC)")  # fmt: skip
    parser.add_argument("--clients", default="", help="closed-loop client counts for the load phases, e.g. 16,64")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each load phase")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    for variant in args.variants.split(","):
        for env in args.env or [""]:
            rows.append(run_config(args, variant, env, Path(f"/tmp/served_breakdown_{len(rows)}")))
            print(json.dumps(rows[-1]), flush=True)
            Path(args.out).write_text(json.dumps(rows, indent=2))
    print(
        f"\n{'variant, env':36} {'batch-1 p50/p99 ms':>18} {'wrong':>5} | per request ms: model queue/input/infer/output"
    )
    for r, key in [(r, k) for r in rows for k in ("sequential", "sequential_shm") if k in r]:
        s = r[key]
        r = {**r, "env": r["env"] + (", inputs in shared memory" if key == "sequential_shm" else "")}
        parts = " | ".join(f"{m} {s[m]['queue']}/{s[m]['input']}/{s[m]['infer']}/{s[m]['output']}" for m in shown(s))
        phases = " | ".join(
            f"{m} " + "/".join(str(v) for k, v in p.items() if k.endswith("_ms"))
            for m, p in s["instance_phases"].items()
        )
        print(f"{r['variant'] + ', ' + r['env']:36} {s['p50_ms']:8.2f} / {s['p99_ms']:7.2f} {s['wrong']:5d} | {parts} | "
              f"rel to in-process {s['rel_median']:.2g} (max {s['rel_max']:.2g}) | "
              f"instance read/launch/wait/answer ms {phases}")  # fmt: skip
    print(
        f"\n{'variant, env':36} {'clients':>7} {'right/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'wrong':>5} {'errors':>6}  avg batch"
    )
    for r in rows:
        for key in [k for k in r if k.startswith("clients_")]:
            c = r[key]
            print(f"{r['variant'] + ', ' + r['env']:36} {key[8:]:>7} {c['right_per_s']:8.1f} {c['p50_ms']:7.1f} "
                  f"{c['p99_ms']:7.1f} {c['wrong']:5d} {c['errors']:6d}  {'/'.join(str(c[m]['batch']) for m in shown(c))}")  # fmt: skip


if __name__ == "__main__":
    main()
