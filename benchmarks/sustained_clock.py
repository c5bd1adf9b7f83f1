"""Does a CUDA-graph replay take as long under sustained load as when the GPU has rested? Per model, at one
batch bucket: replays spaced by an idle gap, then replays back to back for a while, each timed with CUDA
events, with the SM clock and power of the GPU in use (cuda:0, named to nvidia-smi by its UUID) sampled
through the back-to-back phase. The graph's answers are checked against the export's golden samples
first, and a graph that fails them is not timed (``--blas cublaslt`` asks torch for cuBLASLt's products
instead of cuBLAS's before anything is compiled or captured). Needs a CUDA GPU.

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
from vlaserve import interface as io
from vlaserve import repository, value_check
from vlaserve.manifest import Manifest
from vlaserve.model.parity import judged_as
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


def checked(name: str, runtime, version_dir: Path, batch: int, dtype: str) -> dict:
    """The export's golden samples through ``runtime.run`` at ``batch`` (its graph there, if captured), as the
    runner checks them at start; wrong answers end the run loudly, since a time for them would be void."""
    golden = value_check.check_golden(
        runtime.run, value_check.load_golden(version_dir), [batch], dtype, runtime.tensor_kind == "numpy"
    )
    if not value_check.passed(golden):
        raise SystemExit(
            f"{name}: wrong answers through the graph ({golden['worst']:.4g} at {golden['where']}, tolerance "
            f"{golden['tolerance']}): not timed"
        )
    return golden


def served_step(repo: Path, name: str) -> tuple[Path, RunnerParams]:
    """Where step ``name``'s artifacts are and the parameters it is served with: its own model's (``repo/name``),
    or, in a one-model repository (a variant such as gpu_one_model_fp8 written by ``python -m
    vlaserve.repository --variant V --out DIR``), the policy's parameters for that step."""
    configs = repository.runner_configs(repo)  # the steps' own models, or the policy run as one model
    if name in configs:
        return repo / name / "1", RunnerParams.of_model_config(configs[name])
    if io.POLICY in configs:
        params = RunnerParams.of_model_config(configs[io.POLICY])
        if name in params.steps:
            return repo / io.POLICY / "1" / name, params.steps[name]
    raise SystemExit(f"{repo}: no model {name!r}, nor a one-model policy with a step {name!r}")


def prepared(repo: Path, name: str, batch: int) -> tuple:
    """``name``'s runtime on cuda:0 as a served GPU instance of the repository's config has it (compiled, with
    its fused kernels and fp8 products where the config asks, one CUDA graph at ``batch``), checked against
    its golden samples: (runtime, the graph, the golden check, the manifest)."""
    folder, params = served_step(repo, name)
    manifest = Manifest.read(folder / io.MANIFEST_FILE)
    runtime = load_runtime("torchscript", folder, list(manifest.outputs), "cuda:0")
    runtime.fused_kernels, runtime.precision = params.fused_kernels, params.precision
    why_not = runtime.compile(manifest, batch=batch)
    if why_not:
        raise SystemExit(f"{name}: not compiled ({why_not}): the served runtime would differ")
    print(f"{name}: compiled", flush=True)
    why_not = runtime.capture_graphs([batch], manifest.inputs)
    if why_not:
        raise SystemExit(f"{name}: no CUDA graph at batch {batch}: {why_not}")
    dtype = judged_as(manifest.dtype, runtime.precision)  # as the runner judges it (fp8 at its own tolerance)
    return runtime, runtime.graphs.graphs[batch][0], checked(name, runtime, folder, batch, dtype), manifest


def shown(value, width: int) -> str:
    return f"{value:{width}.2f}" if value is not None else f"{'-':>{width}}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repository",
        required=True,
        help="the exported artifacts (make export), or a variant of them written by "
        "python -m vlaserve.repository --variant V --out DIR (its steps' parameters: fp8 where V asks)",
    )
    parser.add_argument("--models", default=",".join(repository.RUNNER_MODELS), help="comma-separated")
    parser.add_argument("--batch", type=int, default=16, help="the batch bucket to replay")
    parser.add_argument("--spaced", type=int, default=10, help="replays after an idle gap")
    parser.add_argument("--gap", type=float, default=1.0, help="the idle gap before each spaced replay, s")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of the back-to-back phase")
    parser.add_argument("--blas", choices=("cublas", "cublaslt"), default="cublas", help="torch's BLAS library")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.spaced < 1 or args.seconds < 5:
        parser.error("--spaced needs at least 1 replay and --seconds at least 5 (the last 5 s are a window)")
    repo, rows = Path(args.repository), []
    torch.backends.cuda.preferred_blas_library(args.blas)
    for i, name in enumerate(args.models.split(",")):
        if i:
            time.sleep(args.gap * 5)  # the next model starts from a rested GPU too
        runtime, graph, golden, manifest = prepared(repo, name, args.batch)
        for _ in range(3):
            timed(graph)
        rest = spaced(graph, args.spaced, args.gap)
        with GpuClocks(gpu=f"GPU-{torch.cuda.get_device_properties(0).uuid}") as clocks:  # cuda:0's own GPU
            load = sustained(graph, args.seconds)
        row = {
            "model": name, "batch": args.batch, "prompt_tokens": manifest.prompt_tokens, "blas": args.blas, "attention": runtime.graphs.chosen[args.batch],
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
    print(
        f"\n{'model':8} {'batch':>5} {'blas':>8} {'golden':>7} {'rested ms':>10} {'first s ms':>11} {'last 5 s ms':>12} {'SM MHz med/min':>15} {'W med':>6}"
    )
    for r in rows:
        c = r["clocks"]
        print(
            f"{r['model']:8} {r['batch']:5d} {r['blas']:>8} {r['golden']['worst']:7.4f} "
            f"{r['spaced_median_ms']:10.2f} {shown(r['first_second_ms'], 11)} "
            f"{shown(r['last_5s_ms'], 12)} {c.get('sm_mhz_median', 0):7.0f}/{c.get('sm_mhz_min', 0):<7.0f} {c.get('power_w_median', 0):6.0f}"
        )


if __name__ == "__main__":
    main()
