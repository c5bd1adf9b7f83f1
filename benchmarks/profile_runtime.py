"""Where the served runtime's time goes on the GPU: per model and batch bucket, the CUDA-graph replay time,
the kernels in it (count, busy time, the gaps between them), the ``--top`` kernels that take the most time
(calls and ms each), and the busy time by kind of kernel (:func:`kernel_kind`: cuBLAS products, attention
kernels, Inductor's generated kernels by what they do, the project's own Triton kernels, the rest).

    python benchmarks/profile_runtime.py --repository /tmp/pi0_repo --buckets 1,16 [--models encoder] [--compile] --out $OUT/profile.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from vlaserve import repository
from vlaserve.manifest import read_manifest
from vlaserve.params import RunnerParams
from vlaserve.runtimes import load_runtime, static_input


def replay_ms(run, repeats: int = 20) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_times(graph, name_chars: int | None = None) -> tuple[int, float, dict[str, list]]:
    """One profiled replay of ``graph``: kernel count, GPU busy ms, and {kernel name (cut to ``name_chars``):
    [calls, ms]}."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list] = {}
    for e in kernels:
        entry = by_name.setdefault(e.name[:name_chars], [0, 0.0])
        entry[0] += 1
        entry[1] += e.device_time / 1e3
    return len(kernels), sum(e.device_time for e in kernels) / 1e3, by_name


KINDS = (
    ("product", ("nvjet", "gemm", "xmma", "cutlass", "cublas", "splitkreduce")),
    ("attention", ("flash", "fmha", "sdpa", "attention")),
    ("inductor reduction", ("triton_red_", "triton_per_")),  # Inductor's reductions: the norms, the softmax
    ("inductor pointwise", ("triton_poi_",)),
    ("copy", ("memcpy", "memset")),
)


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel, from its name: the first of :data:`KINDS` whose patterns its name contains
    (lower case); else "project triton" for a name like ``_norm_qkv_kernel`` (vlaserve.model.kernels' own),
    else "other" (PyTorch's own elementwise kernels among them)."""
    lower = name.lower()
    kind = next((kind for kind, marks in KINDS if any(m in lower for m in marks)), None)
    if kind:
        return kind
    return "project triton" if name.startswith("_") and name.endswith("_kernel") else "other"


def by_kind(by_name: dict[str, list]) -> dict[str, list]:
    """{kind: [calls, ms]} summed over the kernels of ``kernel_times``, the largest first."""
    kinds: dict[str, list] = {}
    for name, (calls, ms) in by_name.items():
        entry = kinds.setdefault(kernel_kind(name), [0, 0.0])
        entry[0] += calls
        entry[1] += ms
    return {k: [c, round(ms, 3)] for k, (c, ms) in sorted(kinds.items(), key=lambda kv: -kv[1][1])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repository", required=True)
    parser.add_argument("--buckets", default="1,16")
    parser.add_argument("--models", default=",".join(repository.RUNNER_MODELS), help="which (default: all)")
    parser.add_argument("--compile", action="store_true", help="compile the layers first (the tuned configs' runtime)")
    parser.add_argument("--top", type=int, default=6, help="how many of the longest kernels to list (default 6)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    repo, buckets = Path(args.repository), [int(b) for b in args.buckets.split(",")]
    rows = []
    for name in args.models.split(","):
        manifest = read_manifest(repo, name)
        runtime = load_runtime("torchscript", repo / name / "1", list(manifest.outputs), "cuda:0")
        if args.compile:  # as the repository's config has it (the gpu variant: the decoder's fused kernels)
            config = repository.read_config(repo / name / repository.CONFIG_FILE)
            runtime.fused_kernels = RunnerParams.of_model_config(config).fused_kernels
            print(f"{name}: compile: {runtime.compile(manifest, batch=buckets[0]) or 'ok'}", flush=True)
        runtime.capture_graphs(buckets, manifest.inputs)
        for batch in buckets:
            graph = runtime.graphs.graphs[batch][0]
            inputs = [static_input(torch, spec, batch, "cuda:0") for spec in manifest.inputs.values()]
            with torch.inference_mode():
                eager_ms = replay_ms(lambda i=inputs, r=runtime: r._call(*i), 5)
            ms = replay_ms(graph.replay)
            count, busy, by_name = kernel_times(graph)
            top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[: args.top]
            row = {
                "model": name, "batch": batch, "eager_ms": round(eager_ms, 2), "graph_ms": round(ms, 2),
                "kernels": count, "busy_ms": round(busy, 2), "gaps_ms": round(ms - busy, 2),
                "top": [(n[:80], round(t, 3), c) for n, (c, t) in top], "kinds": by_kind(by_name),
                "attention": runtime.graphs.chosen[batch], "attention_replay_ms": runtime.graphs.timings[batch],
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
        runtime = None
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"\n{'model':8} {'batch':>5} {'eager ms':>9} {'graph ms':>9} {'kernels':>8} {'busy ms':>8} {'gaps ms':>8}")
    for r in rows:
        print(
            f"{r['model']:8} {r['batch']:5d} {r['eager_ms']:9.2f} {r['graph_ms']:9.2f} {r['kernels']:8d} "
            f"{r['busy_ms']:8.2f} {r['gaps_ms']:8.2f}  attention {r['attention']} {r['attention_replay_ms']}"
        )
        print("    by kind (calls, ms): " + ", ".join(f"{k} {c} {ms:.2f}" for k, (c, ms) in r["kinds"].items()))


if __name__ == "__main__":
    main()
