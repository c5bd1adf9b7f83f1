"""Does a CUDA-graph replay take as long under sustained load as when the GPU has rested? Per model, at one
batch bucket: replays spaced by an idle gap, then replays back to back for a while, each timed with CUDA
events, with GPU 0's SM clock and power sampled by nvidia-smi through the back-to-back phase. The graph's
answers are checked against the export's golden samples first, and a graph that fails them is not timed
(``--blas cublaslt`` asks torch for cuBLASLt's products instead of cuBLAS's before anything is compiled or
captured). Needs a CUDA GPU.

    python -m benchmarks.sustained_clock --repository /tmp/pi0_repo --batch 16 --seconds 15 --out $OUT/clock.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.served_breakdown import GpuClocks
from vlaserve import repository, value_check
from vlaserve.manifest import read_manifest
from vlaserve.params import RunnerParams
from vlaserve.runtimes import load_runtime


def timed(graph) -> float:
    """One replay's GPU time, ms."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def spaced(graph, replays: int, gap_s: float) -> list[float]:
    """``replays`` replays, each after ``gap_s`` seconds of an idle GPU."""
    times = []
    for _ in range(replays):
        time.sleep(gap_s)
        times.append(timed(graph))
    return times


def sustained(graph, seconds: float) -> list[tuple[float, float]]:
    """Replays back to back for ``seconds``: (seconds since the phase began, replay ms) each."""
    times, began = [], time.perf_counter()
    while (now := time.perf_counter() - began) < seconds:
        times.append((now, timed(graph)))
    return times


def median_between(times: list[tuple[float, float]], low: float, high: float) -> float | None:
    inside = [ms for at, ms in times if low <= at < high]
    return round(statistics.median(inside), 3) if inside else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", required=True, help="the exported artifacts (make export)")
    parser.add_argument("--models", default=",".join(repository.RUNNER_MODELS), help="comma-separated")
    parser.add_argument("--batch", type=int, default=16, help="the batch bucket to replay")
    parser.add_argument("--spaced", type=int, default=10, help="replays after an idle gap")
    parser.add_argument("--gap", type=float, default=1.0, help="the idle gap before each spaced replay, s")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of the back-to-back phase")
    parser.add_argument("--blas", choices=("cublas", "cublaslt"), default="cublas", help="torch's BLAS library")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    repo, rows = Path(args.repository), []
    torch.backends.cuda.preferred_blas_library(args.blas)
    for name in args.models.split(","):
        manifest = read_manifest(repo, name)
        runtime = load_runtime("torchscript", repo / name / "1", list(manifest.outputs), "cuda:0")
        config = repository.read_config(repo / name / repository.CONFIG_FILE)
        runtime.fused_kernels = RunnerParams.of_model_config(config).fused_kernels  # as the served runtime
        print(f"{name}: compile: {runtime.compile(manifest, batch=args.batch) or 'ok'}", flush=True)
        why_not = runtime.capture_graphs([args.batch], manifest.inputs)
        if why_not:
            raise SystemExit(f"{name}: no CUDA graph at batch {args.batch}: {why_not}")
        graph = runtime.graphs.graphs[args.batch][0]
        golden = value_check.check_golden(  # through the graph, as served
            runtime.run, value_check.load_golden(repo / name / "1"), [args.batch], manifest.dtype,
            runtime.tensor_kind == "numpy",
        )  # fmt: skip
        if not value_check.passed(golden):
            raise SystemExit(f"{name}: the graph's answers are wrong ({golden['worst']:.4g} at {golden['where']}, "
                             f"tolerance {golden['tolerance']}): not timed")  # fmt: skip
        for _ in range(3):
            timed(graph)
        rest = spaced(graph, args.spaced, args.gap)
        with GpuClocks() as clocks:
            load = sustained(graph, args.seconds)
        row = {
            "model": name, "batch": args.batch, "blas": args.blas, "attention": runtime.graphs.chosen[args.batch],
            "golden": golden,
            "spaced_ms": [round(ms, 3) for ms in rest], "spaced_median_ms": round(statistics.median(rest), 3),
            "replays": len(load), "first_second_ms": median_between(load, 0, 1),
            "last_5s_ms": median_between(load, args.seconds - 5, args.seconds), "clocks": clocks.summary(),
            "per_second_ms": [median_between(load, s, s + 1) for s in range(int(args.seconds))],
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
        runtime = graph = None
        torch.cuda.empty_cache()
        time.sleep(args.gap * 5)  # the next model starts from a rested GPU too
    print(
        f"\n{'model':8} {'batch':>5} {'blas':>8} {'golden':>7} {'rested ms':>10} {'first s ms':>11} {'last 5 s ms':>12} {'SM MHz med/min':>15} {'W med':>6}"
    )
    for r in rows:
        c = r["clocks"]
        print(
            f"{r['model']:8} {r['batch']:5d} {r['blas']:>8} {r['golden']['worst']:7.4f} "
            f"{r['spaced_median_ms']:10.2f} {r['first_second_ms']:11.2f} "
            f"{r['last_5s_ms']:12.2f} {c.get('sm_mhz_median', 0):7.0f}/{c.get('sm_mhz_min', 0):<7.0f} {c.get('power_w_median', 0):6.0f}"
        )


if __name__ == "__main__":
    main()
