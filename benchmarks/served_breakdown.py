"""Where a request's time goes through Triton, one request at a time and under load, every answer checked.

For each spec variant (and each ``--env`` setting, one server start each), served through
``vlaserve.server.variant_server`` over the artifacts exported in ``--repository``:
- ``--requests`` batch-1 requests one after another over gRPC (after 5 to warm up; with ``--shm`` again with
  the inputs in system shared memory, vlaserve.client.PolicyClient): client p50 / p99,
  Triton's own per-model figures per request (queue, input, compute, output; the ensemble's request), and
  the instances' own per execute and model (vlaserve.runner.PHASES: read, launch, wait, answer);
- then, for each count in ``--clients``, that many closed-loop gRPC clients for ``--seconds``: right answers
  per second, their p50 / p99, wrong answers and errors, the batch each model formed on average, and the
  instances' phases per execute (so that the GPU wait under load can be set against the graphs' replay
  times the instances measured at start);
- with ``--gpu-clocks``, nvidia-smi's SM clock and power of the GPU that is the server's device 0 (the first
  of CUDA_VISIBLE_DEVICES where set, which the server inherits) sampled about every 250 ms through each load
  phase (median and lowest MHz, median and highest W): whether the GPU held its clock under load.
The request is the export's golden sample (item 0); every answer is compared with the actions the export
computed for it in-process (over the export's parity tolerance: wrong). Prints a table last.

    python -m benchmarks.served_breakdown --repository /tmp/pi0_repo --variants gpu,gpu_unfused \\
        --requests 200 --clients 16,64 --seconds 20 --out $OUT/served.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import threading
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


def visible_gpu(index: int = 0) -> str:
    """How nvidia-smi's ``-i`` names CUDA device ``index`` of a process started with this environment: the
    index-th entry of CUDA_VISIBLE_DEVICES where that is set (an index or a UUID; nvidia-smi takes both), else
    ``index`` itself (nvidia-smi numbers GPUs in PCI bus order, as CUDA does among identical GPUs)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        return str(index)
    if index >= len(visible):
        raise ValueError(f"CUDA device {index}, but CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}")
    return visible[index]


class GpuClocks:
    """One GPU's SM clock (MHz) and power (W) from nvidia-smi, one query every ``interval_s`` in a thread
    while in the block; :meth:`summary` after it. ``gpu`` is what nvidia-smi's ``-i`` takes (an index in its
    own numbering or a UUID); by default the GPU that CUDA device 0 is here (:func:`visible_gpu`). A host
    without nvidia-smi gets an empty summary, not an error. (One query a time, not nvidia-smi's own loop: a
    looping nvidia-smi stopped by a signal may leave its last lines unflushed in a pipe.)"""

    QUERY = ("--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits")

    def __init__(self, interval_s: float = 0.25, gpu: str | None = None):
        self.interval_s, self.lines, self.stop, self.thread = interval_s, [], threading.Event(), None
        self.gpu = visible_gpu() if gpu is None else gpu
        self.command = ("nvidia-smi", "-i", self.gpu, *self.QUERY)

    def __enter__(self):
        if shutil.which(self.command[0]):
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.is_set():
            try:
                out = subprocess.run(self.command, capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                out = ""
            self.lines.extend(out.splitlines())
            self.stop.wait(self.interval_s)

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread is not None:
            self.thread.join()

    def summary(self) -> dict:
        summary = clock_summary(self.lines)
        return {**summary, "gpu": self.gpu} if summary else {}


def clock_summary(lines: list[str]) -> dict:
    """nvidia-smi's "<MHz>, <W>" lines: how many, median and lowest SM MHz, median and highest W (lines that
    do not parse, such as "[N/A]", are left out)."""
    samples = []
    for line in lines:
        try:
            mhz, watts = (float(v) for v in line.split(","))
        except ValueError:
            continue
        samples.append((mhz, watts))
    if not samples:
        return {}
    mhz, watts = zip(*samples)
    return {"samples": len(samples), "sm_mhz_median": statistics.median(mhz), "sm_mhz_min": min(mhz),
            "power_w_median": statistics.median(watts), "power_w_max": max(watts)}  # fmt: skip


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
                before, sums = metrics.scrape(server.metrics_url), execute_sums(server)
                with Load([("grpc", server.grpc_url)] * clients, Reference(request, reference, tolerance)) as load:
                    with GpuClocks() if args.gpu_clocks else contextlib.nullcontext() as clocks:
                        start = time.time()
                        time.sleep(args.seconds)
                        end = time.time()
                after, sums_after = metrics.scrape(server.metrics_url), execute_sums(server)
                # requests started within the window (the clients' last requests finish after it)
                counts = collections.Counter(o for t, o, _ in load.outcomes if start <= t < end)
                ms = [s * 1e3 for t, s in load.latencies if start <= t < end]
                row[f"clients_{clients}"] = {
                    "right_per_s": round(counts["ok"] / args.seconds, 1), "wrong": counts["wrong"],
                    "errors": counts["permanent"] + counts["retryable"], "p50_ms": percentile(ms, 0.5),
                    "p99_ms": percentile(ms, 0.99), **per_model(before, after),
                    "instance_phases": execute_phases(sums, sums_after),
                    **({"gpu_clocks": clocks.summary()} if args.gpu_clocks else {}),
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
    parser.add_argument("--gpu-clocks", action="store_true",
                        help="sample the server's GPU's SM clock and power with nvidia-smi through each load phase")  # fmt: skip
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
        f"\n{'variant, env':36} {'clients':>7} {'right/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'wrong':>5} {'errors':>6}  avg batch | instance wait ms per execute | SM MHz median/min"
    )
    for r in rows:
        for key in [k for k in r if k.startswith("clients_")]:
            c = r[key]
            print(f"{r['variant'] + ', ' + r['env']:36} {key[8:]:>7} {c['right_per_s']:8.1f} {c['p50_ms']:7.1f} "
                  f"{c['p99_ms']:7.1f} {c['wrong']:5d} {c['errors']:6d}  {'/'.join(str(c[m]['batch']) for m in shown(c))} | "
                  f"{'/'.join(str(p['wait_ms']) for p in c['instance_phases'].values())} | "
                  f"{'/'.join(str(c.get('gpu_clocks', {}).get(k, '-')) for k in ('sm_mhz_median', 'sm_mhz_min'))}")  # fmt: skip


if __name__ == "__main__":
    main()
