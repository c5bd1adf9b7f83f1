"""``python -m loadtest.sweep``: run Locust headless over a list of user counts and record what happened.

Each step runs ``locust`` (``loadtest/locustfile.py``) as its own process for a fixed time, and
scrapes Triton's ``/metrics`` before and after it. A step records throughput (inferences/s, counting
the batch size), p50/p90/p95/p99 latency, failures, and per model the queue and compute time and
the average batch size. The sweep writes ``results.json``, Locust's CSV and HTML per step, and
``sweep.png``, then prints a table.

``--compare naive,batching,batching_multi`` runs the same sweep over repository variants made from
the spec (each with its own server) and prints them side by side, the best under ``--slo-ms`` marked.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from loadtest import FAILED_SUFFIX, metrics, report
from vlaserve import interface as io
from vlaserve.errors import VlaserveError

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
GATEWAY_LOCUSTFILE = Path(__file__).with_name("gateway_locustfile.py")  # --protocol gateway: robots via the gateway


class LoadtestError(RuntimeError):
    """The load test cannot run (server down, unknown model, Locust failed to start)."""


def _locust_cmd() -> list[str]:
    # as a module of this interpreter: its `locust` script need not sit beside it (in NVIDIA's image,
    # python3 is /usr/bin's and pip's scripts go to /usr/local/bin)
    return [sys.executable, "-m", "locust"]


def check_target(host: str, protocol: str, model: str, metrics_url: str) -> None:
    """One clear error when the server (or the gateway) is unreachable or the model is not there."""
    from vlaserve.client import readiness_problem

    if protocol == "gateway":
        try:
            urllib.request.urlopen(f"http://{host}/healthz", timeout=5)
        except (urllib.error.URLError, OSError) as exc:
            raise LoadtestError(f"the gateway at {host} is not healthy (/healthz): {exc}") from None
    else:
        problem = readiness_problem(host, protocol, model)
        if problem:
            raise LoadtestError(problem)
    try:
        metrics.scrape(metrics_url)
    except (urllib.error.URLError, OSError) as exc:
        raise LoadtestError(f"cannot read Triton's metrics at {metrics_url}: {exc}") from None


def percentile(histogram: dict[int, int], q: float) -> float:
    """The q-quantile (0..1) of Locust's response-time histogram {rounded ms: count}."""
    total = sum(histogram.values())
    if not total:
        return 0.0
    seen = 0
    for ms in sorted(histogram):
        seen += histogram[ms]
        if seen >= q * total:
            return float(ms)
    return float(max(histogram))


def read_locust_json(path: Path) -> dict:
    """Final figures from Locust's ``--json-file`` (exact: its CSV can miss the last second)."""
    entries = json.loads(Path(path).read_text())
    # Answers only: failed requests have their own entry (locustfile.FAILED_SUFFIX). Throughput counts
    # answers, and the latency percentiles are those of answers.
    answered = [e for e in entries if not e["name"].endswith(FAILED_SUFFIX)]
    histogram: dict[int, int] = {}
    for entry in answered:
        for ms, count in entry["response_times"].items():
            histogram[int(float(ms))] = histogram.get(int(float(ms)), 0) + count
    requests = sum(e["num_requests"] for e in entries)
    answers = sum(e["num_requests"] - e["num_failures"] for e in answered)
    span = (
        max((e["last_request_timestamp"] or 0) for e in entries) - min(e["start_time"] for e in entries)
        if entries
        else 0
    )
    return {
        "requests": requests,
        "failures": sum(e["num_failures"] for e in entries),
        "rps": answers / span if span > 0 else 0.0,
        "avg_ms": sum(e["total_response_time"] for e in answered) / answers if answers else 0.0,
        **{f"p{int(q * 100)}_ms": percentile(histogram, q) for q in (0.5, 0.9, 0.95, 0.99)},
    }


def run_step(args, users: int, out_dir: Path, label: str = "") -> dict:
    """One Locust run at ``users`` concurrent users; its figures and the server's metric deltas."""
    prefix = out_dir / f"{label}users_{users}"
    gateway = args.protocol == "gateway"
    cmd = [
        *_locust_cmd(), "-f", str(GATEWAY_LOCUSTFILE if gateway else LOCUSTFILE), "--headless", "--only-summary",
        "-u", str(users), "-r", str(users), "-t", f"{args.duration}s", "--stop-timeout", "10",
        "--host", args.host, "--csv", str(prefix), "--html", f"{prefix}.html", "--json-file", str(prefix),
        "--vla-mode", args.mode, "--vla-rate-hz", str(args.rate_hz),
        *(["--vla-robot", args.robot] if gateway else
          ["--vla-protocol", args.protocol, "--vla-batch", str(args.batch), "--vla-model", args.model]),
    ]  # fmt: skip
    before = metrics.scrape(args.metrics_url)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 60)
    elapsed = time.perf_counter() - started
    after = metrics.scrape(args.metrics_url)
    if proc.returncode == 2 or not Path(f"{prefix}.json").exists():
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "error" in ln.lower()]
        raise LoadtestError(lines[-1] if lines else f"locust exited with {proc.returncode}")
    stats = read_locust_json(f"{prefix}.json")
    step = {
        "users": users,
        "mode": args.mode,
        "batch": args.batch,
        "duration_s": args.duration,
        "wall_s": round(elapsed, 2),
        **stats,
        "throughput": stats["rps"] * args.batch,
        "server": metrics.deltas(before, after),
    }
    return step


def sweep(args, out_dir: Path, label: str = "") -> list[dict]:
    steps = []
    for users in args.users:
        print(
            f"[loadtest] {label or 'sweep'}: {users} users for {args.duration} s ({args.mode}, {args.protocol}) ...",
            flush=True,
        )
        step = run_step(args, users, out_dir, f"{label}_" if label else "")
        print(
            f"[loadtest]   {step['throughput']:.1f} inf/s, p50 {step['p50_ms']:.0f} ms, p99 {step['p99_ms']:.0f} ms, "
            f"{step['failures']} failures",
            flush=True,
        )
        steps.append(step)
    return steps


def compare(args, out_dir: Path) -> dict[str, list[dict]]:
    """The sweep over each variant of the spec, each served by its own tritonserver."""
    from vlaserve import repository
    from vlaserve.manifest import read_manifest_settings
    from vlaserve.server import variant_server

    repo = Path(args.repository)
    if read_manifest_settings(repo) is None:
        raise LoadtestError(f"{repo} has no exported artifacts: run `make export` first")
    results = {}
    for variant in args.compare:
        spec = repository.load_spec(repo / repository.SPEC_FILE, variant)
        server = variant_server(spec, repo, out_dir / "repos" / variant, out_dir / "servers" / variant,
                                cuda_memory_pool_mb=args.cuda_memory_pool_mb)  # fmt: skip
        under = " under MPS" if server.options.mps else ""
        print(
            f"[loadtest] {variant}: starting tritonserver{under} over {server.options.model_repository} ...", flush=True
        )
        with server:
            args.host = server.http_url if args.protocol == "http" else server.grpc_url
            args.metrics_url = server.metrics_url
            results[variant] = sweep(args, out_dir, variant)
            instances = [json.loads(p.read_text()) for p in sorted(server.status_dir.glob("*.json"))]
            for step in results[variant]:
                step["instances"] = instances
    return results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.sweep",
        description="Locust sweep over user counts against a running Triton server (or --compare variants).",
    )
    parser.add_argument("--host", help="server host:port for --protocol (default: 127.0.0.1:8000 http, :8001 grpc)")
    parser.add_argument("--metrics-url", default=f"http://{io.DEFAULT_HOST}:{io.METRICS_PORT}/metrics")
    parser.add_argument("--protocol", choices=["http", "grpc", "gateway"], default="http",
                        help="default: http; gateway: robots through vlaserve.gateway (--host is its host:port)")  # fmt: skip
    parser.add_argument("--robot", default="droid", help="--protocol gateway: the robot's settings in the spec")
    parser.add_argument("--users", default="1,2,4,8", help="comma-separated user counts (default: 1,2,4,8)")
    parser.add_argument("--duration", type=int, default=20, help="seconds per step (default: 20)")
    parser.add_argument("--mode", choices=["closed", "robot"], default="closed", help="closed loop or fixed rate")
    parser.add_argument("--rate-hz", type=float, default=10.0, help="per-user rate in robot mode (default: 10)")
    parser.add_argument("--batch", type=int, default=1, help="items per request (default: 1)")
    parser.add_argument("--model", default=io.POLICY, help=f"default: {io.POLICY}")
    parser.add_argument(
        "--compare", help="comma-separated spec variants to compare (e.g. naive,batching,batching_multi)"
    )
    parser.add_argument("--repository", default="model_repository", help="source repository for --compare")
    parser.add_argument(
        "--cuda-memory-pool-mb", type=int, default=0, help="--compare servers: Triton's CUDA pool (GPU)"
    )
    parser.add_argument("--slo-ms", type=float, default=200.0, help="p99 SLO for marking the best (default: 200)")
    parser.add_argument("--out", help="report folder (default: reports/<timestamp>)")
    args = parser.parse_args(argv)
    try:
        args.users = [int(u) for u in args.users.split(",")]
    except ValueError:
        parser.error(f"--users: got {args.users!r}, expected comma-separated integers")
    if not args.users or min(args.users) < 1 or args.duration < 1 or args.batch < 1:
        parser.error("--users, --duration and --batch must be positive")
    args.compare = [v for v in args.compare.split(",") if v] if args.compare else None
    if args.protocol == "gateway" and (args.compare or args.batch != 1):
        parser.error("--protocol gateway: one observation per request, against a running gateway (no --compare)")
    port = {"http": io.HTTP_PORT, "grpc": io.GRPC_PORT, "gateway": io.GATEWAY_PORT}[args.protocol]
    args.host = args.host or f"{io.DEFAULT_HOST}:{port}"
    return args


def run(args) -> dict:
    out_dir = Path(args.out or Path("reports") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.compare:
        results = compare(args, out_dir)
    else:
        check_target(args.host, args.protocol, args.model, args.metrics_url)
        results = {"sweep": sweep(args, out_dir)}
    summary = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "slo_ms": args.slo_ms,
        "results": results,
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    report.plot(results, out_dir / "sweep.png", args.slo_ms)
    for name, steps in results.items():
        print(f"\n{name}:\n{report.table([report.row_of(s) for s in steps])}")
    if args.compare:
        print(f"\ncompare (best step per variant with p99 <= {args.slo_ms:g} ms and no failures):")
        print(report.compare_table(results, args.slo_ms))
    print(f"\nreport: {out_dir}/results.json, {out_dir}/sweep.png, Locust CSV/HTML per step")
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (LoadtestError, VlaserveError) as exc:
        print(f"loadtest: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
