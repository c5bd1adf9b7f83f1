"""The served policy against its peers, in one run.

    python benchmarks/peers.py --out reports/peers          # a GPU machine: pi0, bf16, 2 views
    python benchmarks/peers.py --preset tiny --dtype fp32 --device cpu --users 2 --duration 3 --out /tmp/peers

Peers, each measured the same way (batch-1 requests one after another, inputs from host memory and
actions back to it):

- ``eager``: the PyTorch policy in-process (``vlaserve.model.policy``), no graphs;
- ``graphs``: the served runtime in-process: the exported TorchScript encoder and decoder, one CUDA graph
  per batch bucket (on a CPU the same runtime without graphs; the note says so);
- ``compiled``: the same with each layer compiled by torch.compile (Inductor) before the graphs are
  captured: what the tuned Triton configs serve (on a CPU uncompiled; the note says so);
- ``triton_naive``, ``triton_tuned``, ``triton_tuned_mps``: the spec's variants ``gpu_naive``, ``gpu`` and
  ``gpu_mps`` served by tritonserver: client batch-1 p50/p99 over gRPC and HTTP, then a Locust sweep over
  ``--users``.

Throughput at p99 <= ``--slo-ms``: for the Triton configs the best sweep step within it (no failures);
for ``graphs`` and ``compiled`` the best batch bucket whose batch latency is within it (the runtime's ceiling, no
queueing). The in-process peers run in a child process, so this process never holds a CUDA context
while the servers (and the MPS daemon) run. Prints one table last and writes ``results.json``.
Exports the model first unless ``--repository`` holds an export of the same preset, views and dtype.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from loadtest import metrics as loadmetrics
from loadtest import report
from loadtest import sweep as loadsweep
from vlaserve import interface as io
from vlaserve import repository
from vlaserve.manifest import ModelSettings, read_manifest, read_manifest_settings
from vlaserve.model.parity import REL_TOLERANCE
from vlaserve.params import RunnerParams
from vlaserve.spec import Spec
from vlaserve.value_check import golden_reference

TRITON_CONFIGS = {
    "triton_naive": "gpu_naive", "triton_tuned": "gpu", "triton_tuned_mps": "gpu_mps",
    # sharing the GPU between two instances per model: time-sliced, MPS without limits, MPS at 50 % each
    "triton_split": "gpu_split", "triton_split_mps100": "gpu_split_mps100", "triton_split_mps": "gpu_split_mps",
}  # fmt: skip
# The in-process peer running the same runtime as each Triton peer: its actions are the reference, and the
# overhead target compares against its batch-1 time.
SAME_RUNTIME = {peer: "graphs" if peer == "triton_naive" else "compiled" for peer in TRITON_CONFIGS}
# Served vs in-process with the same runtime: the same kernels, so tighter than the export's parity.
VALUE_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 2e-2}
GOLDEN_TOLERANCE = REL_TOLERANCE  # served vs the export's eager run: the export's own parity tolerance
TARGETS = {"batch1_p50_ms": 15.0, "throughput": 200.0, "overhead": 1.25}


def log(msg: str) -> None:
    print(f"[peers] {msg}", flush=True)


def latencies(fn, repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def summary(ms: list[float]) -> dict:
    return {"p50_ms": round(statistics.median(ms), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2), "n": len(ms)}


# ---- in-process peers (child process) ---------------------------------------------------------------
def inprocess(args) -> dict:
    """Eager PyTorch and the served runtime (with CUDA graphs; then also compiled), in this process."""
    import torch

    from export.cli import TORCH_DTYPES
    from vlaserve.client import make_request
    from vlaserve.model.policy import build_policy
    from vlaserve.model.presets import get_preset

    repo = Path(args.repository)
    manifests = {m: read_manifest(repo, m) for m in repository.RUNNER_MODELS}
    cfg = get_preset(args.preset, args.views)
    device = "cuda:0" if args.device == "cuda" else "cpu"
    request = make_request(1, args.views, seed=0, with_noise=True, vocab_size=cfg.vocab_size)
    host = {k: torch.from_numpy(v) for k, v in request.items()}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    results, actions = {}, {}

    log(f"eager: building the {cfg.name} policy on {device} ...")
    policy = build_policy(cfg, seed=manifests[io.ENCODER].seed, dtype=TORCH_DTYPES[args.dtype], device=device)

    def eager(batch_inputs=host):
        with torch.inference_mode():
            t = {k: v.to(device) for k, v in batch_inputs.items()}
            return policy(t[io.IMAGES], t[io.TOKENS], t[io.STATE], t[io.NOISE]).cpu()

    actions["eager"] = eager().numpy()
    results["eager"] = {"batch1": summary(latencies(eager, args.repeats))}
    log(f"eager: batch-1 p50 {results['eager']['batch1']['p50_ms']} ms")
    policy = None  # its memory back before the runtime loads
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    buckets = [int(b) for b in args.buckets.split(",")]
    for peer in ("graphs", "compiled"):
        results[peer], actions[peer] = served_inprocess(args, peer, manifests, buckets, host, cfg.vocab_size, device)
        sync()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    results["eager"]["vs_graphs_rel"] = rel(actions["eager"], actions["graphs"])
    results["compiled"]["vs_graphs_rel"] = rel(actions["compiled"], actions["graphs"])
    np.savez(Path(args.out) / "inprocess_actions.npz", **actions)
    return results


def served_inprocess(args, peer: str, manifests: dict, buckets: list, host: dict, vocab_size: int, device: str):
    """The served runtime in this process: TorchScript under CUDA graphs (``graphs``), or with its layers
    compiled as well (``compiled``, what the tuned configs serve). ``host`` is the batch-1 request (torch, on
    the host) that the eager peer was timed on. Returns (results, batch-1 actions)."""
    import torch

    from vlaserve.client import make_request
    from vlaserve.runtimes import load_runtime

    repo = Path(args.repository)
    runtimes, notes = {}, []
    for name in repository.RUNNER_MODELS:
        outputs = list(manifests[name].outputs)
        runtimes[name] = load_runtime("torchscript", repo / name / "1", outputs, device)
        started = time.perf_counter()
        if peer == "compiled":  # as the repository's config has it (the gpu variant: the decoder's fused kernels)
            config = repository.read_config(repo / name / repository.CONFIG_FILE)
            runtimes[name].fused_kernels = RunnerParams.of_model_config(config).fused_kernels
            why_not = runtimes[name].compile(manifests[name], batch=buckets[0])
            notes.append(why_not or f"{name}: compiled in {time.perf_counter() - started:.1f} s")
        why_not = runtimes[name].capture_graphs(buckets, manifests[name].inputs)
        graphs = runtimes[name].graphs
        chosen = ", ".join(f"{b}: {graphs.chosen[b]}" for b in buckets) if graphs else ""
        notes.append(
            why_not or f"{name}: {len(buckets)} graphs in {time.perf_counter() - started:.1f} s (attention {chosen})"
        )
    log(f"{peer}: " + "; ".join(dict.fromkeys(notes)))

    def served_runtime(batch_inputs=host):
        prefix_kv, mask = runtimes[io.ENCODER].run(
            {io.IMAGES: batch_inputs[io.IMAGES], io.TOKENS: batch_inputs[io.TOKENS]}
        )
        out = runtimes[io.DECODER].run(
            {
                io.PREFIX_KV: prefix_kv,
                io.PREFIX_MASK: mask,
                io.STATE: batch_inputs[io.STATE],
                io.NOISE: batch_inputs[io.NOISE],
            }
        )
        return out[0].cpu()

    actions = served_runtime().numpy()
    per_bucket = {}
    for batch in buckets:
        tensors = {
            k: torch.from_numpy(v)
            for k, v in make_request(batch, args.views, seed=batch, with_noise=True, vocab_size=vocab_size).items()
        }
        ms = latencies(lambda t=tensors: served_runtime(t), max(3, args.repeats // max(1, batch // 2)))
        p50 = statistics.median(ms)
        per_bucket[batch] = {
            "p50_ms": round(p50, 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "throughput": round(batch / p50 * 1e3, 1),
        }
        log(f"{peer}: batch {batch}: {p50:.1f} ms, {batch / p50 * 1e3:.1f} inf/s")
    within = [b for b, r in per_bucket.items() if r["p99_ms"] <= args.slo_ms]
    best = max(within, key=lambda b: per_bucket[b]["throughput"]) if within else None
    results = {
        "batch1": summary(latencies(served_runtime, args.repeats)),
        "per_batch": per_bucket,
        "best": {"at": f"batch {best}", **per_bucket[best]} if best else None,
        "note": "; ".join(dict.fromkeys(notes)),
    }
    log(f"{peer}: batch-1 p50 {results['batch1']['p50_ms']} ms")
    return results, actions


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


# ---- Triton peers --------------------------------------------------------------------------------
def variant_spec(variant: str, device: str) -> tuple[Spec, str]:
    """The spec of ``variant``; on a CPU run its GPU instance groups become CPU ones (MPS dropped, noted)."""
    spec = repository.load_spec(
        Path(__file__).resolve().parents[1] / "model_repository" / repository.SPEC_FILE, variant
    )
    note = ""
    if device == "cpu":
        for name in repository.RUNNER_MODELS:
            groups = spec.runners[name].instance_groups
            if any(g.mps_thread_percentage is not None for g in groups):
                note = "no GPU: MPS percentages dropped (the same config without MPS)"
            on_cpu = [
                {**dataclasses.asdict(g), "kind": "cpu", "gpus": None, "mps_thread_percentage": None} for g in groups
            ]
            spec = spec.with_model(name, instance_groups=on_cpu)
    return spec, note


def serve_and_measure(args, peer: str, variant: str, reference: np.ndarray, request: dict | None = None) -> dict:
    from vlaserve.client import PolicyClient, make_request
    from vlaserve.server import variant_server

    out = Path(args.out)
    spec, note = variant_spec(variant, args.device)
    server = variant_server(spec, Path(args.repository), out / "repos" / variant, out / "servers" / variant,
                            cuda_memory_pool_mb=args.cuda_memory_pool_mb if args.device == "cuda" else 0,
                            ready_timeout=600)  # fmt: skip
    log(f"{peer}: starting tritonserver over variant {variant}{' under MPS' if server.options.mps else ''} ...")
    started = time.perf_counter()
    result = {"variant": variant, "note": note}
    with server:
        result["ready_s"] = round(time.perf_counter() - started, 1)
        log(f"{peer}: ready in {result['ready_s']} s")
        if request is None:
            request = make_request(1, args.views, seed=0, with_noise=True, vocab_size=settings_vocab(args))
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            client = PolicyClient(url, protocol, timeout_s=300)
            served = client.infer(request)
            result[f"rel_vs_inprocess_{protocol}"] = rel(served, reference)
            before = loadmetrics.scrape(server.metrics_url)
            result[f"batch1_{protocol}"] = summary(latencies(lambda c=client: c.infer(request), args.repeats))
            # where the batch-1 time goes inside the server: per model, ms per request (Triton's counters)
            result[f"batch1_{protocol}_server"] = {
                model: {k: round(v[k], 2) for k in ("request_ms", "queue_ms", "compute_ms", "avg_batch_size")}
                for model, v in loadmetrics.deltas(before, loadmetrics.scrape(server.metrics_url))["models"].items()
            }
            log(
                f"{peer}: {protocol} batch-1 p50 {result[f'batch1_{protocol}']['p50_ms']} ms, rel vs in-process {result[f'rel_vs_inprocess_{protocol}']:.1e}"
            )
        worst = max(result["rel_vs_inprocess_grpc"], result["rel_vs_inprocess_http"])
        tolerance = GOLDEN_TOLERANCE[args.dtype] if args.reference == "golden" else VALUE_TOLERANCE[args.dtype]
        if not worst <= tolerance:  # NaN fails too
            result["wrong_values"] = True
            result["note"] = (note + "; " if note else "") + (
                f"WRONG VALUES: served actions differ from in-process (rel {worst:.2g}); not counted for the targets"
            )
            log(f"{peer}: {result['note']}")
        best_protocol = min(("grpc", "http"), key=lambda p: result[f"batch1_{p}"]["p50_ms"])
        result["batch1"] = {**result[f"batch1_{best_protocol}"], "protocol": best_protocol}
        sweep_args = loadsweep.parse_args(
            ["--users", args.users, "--duration", str(args.duration), "--protocol", "http"]
        )
        sweep_args.host, sweep_args.metrics_url = server.http_url, server.metrics_url
        steps = loadsweep.sweep(sweep_args, out / "sweeps", peer)
        result["sweep"] = steps
        best = report.best_under_slo(steps, args.slo_ms)
        result["best"] = (
            {
                "at": f"{best['users']} users",
                "throughput": round(best["throughput"], 1),
                "p50_ms": best["p50_ms"],
                "p99_ms": best["p99_ms"],
            }
            if best
            else None
        )
        result["instances"] = [json.loads(p.read_text()) for p in sorted(server.status_dir.glob("*.json"))]
    return result


def settings_vocab(args) -> int:
    manifest = read_manifest(Path(args.repository), io.ENCODER)
    return manifest.vocab_size


def gpu_name() -> str:
    """The GPU and driver as nvidia-smi reports them (no CUDA context in this process)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        return "unknown"


# ---- the run -------------------------------------------------------------------------------------
def ensure_export(args) -> float | None:
    """Export into --repository unless it already holds this preset/views/dtype; returns the seconds taken."""
    repo = Path(args.repository)
    settings = read_manifest_settings(repo) if repo.is_dir() else None
    if settings == ModelSettings(args.preset, args.views, args.dtype):
        log(f"using the export in {repo}")
        return None
    repo.mkdir(parents=True, exist_ok=True)
    spec = Path(__file__).resolve().parents[1] / "model_repository" / repository.SPEC_FILE
    (repo / repository.SPEC_FILE).write_text(spec.read_text())
    cmd = [sys.executable, "-m", "export", "--preset", args.preset, "--views", str(args.views), "--dtype", args.dtype,
           "--device", args.device, "--variant", "gpu", "--repository", str(repo)]  # fmt: skip
    log("exporting: " + " ".join(cmd[1:]))
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    return round(time.perf_counter() - started, 1)


def row(peer: str, r: dict) -> dict:
    best = r.get("best") or {}
    return {
        "peer": peer,
        "p50": r["batch1"]["p50_ms"],
        "p99": r["batch1"]["p99_ms"],
        "tput": f"{best['throughput']:.1f}" if best else "-",
        "at": best.get("at", "none within SLO" if "best" in r else "(batch 1 only)"),
        "tput_p99": f"{best['p99_ms']:.1f}" if best else "-",
        "rel": f"{max(r['rel_vs_inprocess_grpc'], r['rel_vs_inprocess_http']):.2g}"
        if "rel_vs_inprocess_grpc" in r
        else "-",
    }


def targets(results: dict) -> list[dict]:
    """Each target against the best Triton figure, with the miss as a factor."""
    triton = {k: v for k, v in results.items() if k.startswith("triton_") and not v.get("wrong_values")}
    if not triton:
        return []
    p50 = min(r["batch1"]["p50_ms"] for r in triton.values())
    tput = max((r["best"] or {}).get("throughput", 0.0) for r in triton.values())
    checks = [
        {"target": "batch-1 client p50 through Triton", "goal": f"<= {TARGETS['batch1_p50_ms']:g} ms", "measured": f"{p50:.1f} ms", "met": p50 <= TARGETS["batch1_p50_ms"], "factor": round(p50 / TARGETS["batch1_p50_ms"], 2)},
        {"target": "throughput with p99 <= SLO", "goal": f">= {TARGETS['throughput']:g} inf/s", "measured": f"{tput:.1f} inf/s", "met": tput >= TARGETS["throughput"], "factor": round(tput / TARGETS["throughput"], 2)},
    ]  # fmt: skip
    if "compiled" in results and "triton_tuned" in triton:
        ratio = results["triton_tuned"]["batch1"]["p50_ms"] / results["compiled"]["batch1"]["p50_ms"]
        checks.append({"target": "Triton overhead (tuned p50 / in-process compiled p50, the same runtime)", "goal": f"<= {TARGETS['overhead']:g}x", "measured": f"{ratio:.2f}x", "met": ratio <= TARGETS["overhead"], "factor": round(ratio / TARGETS["overhead"], 2)})  # fmt: skip
    return checks


def render(results: dict, checks: list[dict], slo_ms: float) -> str:
    rows = [row(peer, r) for peer, r in results.items()]
    columns = [
        ("peer", "peer", "{}"), ("p50", "batch-1 p50 ms", "{:.1f}"), ("p99", "batch-1 p99 ms", "{:.1f}"),
        ("tput", f"inf/s (p99<={slo_ms:g} ms)", "{}"), ("at", "at", "{}"), ("tput_p99", "p99 there ms", "{}"),
        ("rel", "actions rel vs reference", "{}"),
    ]  # fmt: skip
    lines = [report.table(rows, columns)]
    lines += [f"  {peer}: {r['note']}" for peer, r in results.items() if r.get("note")]
    if checks:
        lines.append("")
        lines.append(report.table(
            [{**c, "met": "yes" if c["met"] else f"no ({c['factor']:.2f}x of the goal)"} for c in checks],
            [("target", "target", "{}"), ("goal", "goal", "{}"), ("measured", "measured", "{}"), ("met", "met", "{}")],
        ))  # fmt: skip
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/peers.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="pi0", help="default: pi0")
    parser.add_argument("--views", type=int, default=2, help="default: 2")
    parser.add_argument("--dtype", default="bf16", help="default: bf16")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="default: cuda")
    parser.add_argument("--repository", help="an exported repository (default: <out>/repo, exported if needed)")
    parser.add_argument(
        "--triton",
        default="triton_naive,triton_tuned,triton_tuned_mps",
        help=f"Triton peers to run, of {', '.join(TRITON_CONFIGS)} (default: %(default)s)",
    )
    parser.add_argument("--buckets", default="1,2,4,8,16", help="graph buckets of the in-process runtime")
    parser.add_argument("--users", default="1,4,8,16,32", help="Locust user counts of each Triton sweep")
    parser.add_argument("--duration", type=int, default=12, help="seconds per sweep step (default: 12)")
    parser.add_argument("--repeats", type=int, default=50, help="batch-1 calls timed per peer (default: 50)")
    parser.add_argument("--slo-ms", type=float, default=200.0, help="p99 SLO for throughput (default: 200)")
    parser.add_argument("--cuda-memory-pool-mb", type=int, default=2048, help="Triton's CUDA pool (default: 2048)")
    parser.add_argument("--out", default="reports/peers", help="results folder (default: reports/peers)")
    parser.add_argument(
        "--reference", choices=["inprocess", "golden"], default="inprocess",
        help="what served actions are checked against: the in-process peers run here (default), or the export's "
        "golden samples (eager PyTorch at export; no in-process peers run, so no overhead figure)",
    )  # fmt: skip
    parser.add_argument("--phase", choices=["all", "inprocess"], default="all", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repository = args.repository or str(Path(args.out) / "repo")
    args.triton = [p for p in args.triton.split(",") if p]
    unknown = set(args.triton) - set(TRITON_CONFIGS)
    if unknown:
        parser.error(f"--triton: unknown {sorted(unknown)}; choose from {', '.join(TRITON_CONFIGS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.phase == "inprocess":
        (out / "inprocess.json").write_text(json.dumps(inprocess(args), indent=2))
        return 0
    started = time.perf_counter()
    export_s = ensure_export(args)
    child = [
        sys.executable, __file__, "--phase", "inprocess", "--preset", args.preset, "--views", str(args.views),
        "--dtype", args.dtype, "--device", args.device, "--repository", args.repository, "--out", args.out,
        "--buckets", args.buckets, "--repeats", str(args.repeats), "--slo-ms", str(args.slo_ms),
    ]  # fmt: skip
    if args.reference == "golden":
        results = {}
        request, golden = golden_reference(Path(args.repository))
        references = {name: golden for name in SAME_RUNTIME.values()}
        log("served actions are checked against the export's golden samples (no in-process peers)")
    else:
        log("in-process peers (child process) ...")
        subprocess.run(child, check=True)
        results, request = json.loads((out / "inprocess.json").read_text()), None
        references = np.load(out / "inprocess_actions.npz")
    for peer in args.triton:
        results[peer] = serve_and_measure(args, peer, TRITON_CONFIGS[peer], references[SAME_RUNTIME[peer]], request)
        (out / "results-partial.json").write_text(json.dumps(results, indent=2) + "\n")
    checks = targets(results)
    import torch  # its version only: this process creates no CUDA context

    summary_doc = {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/peers.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "gpu": gpu_name() if args.device == "cuda" else None,
        },
        "model": {"preset": args.preset, "views": args.views, "dtype": args.dtype},
        "export_s": export_s,
        "wall_s": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "slo_ms": args.slo_ms,
        "results": results,
        "targets": checks,
    }
    (out / "results.json").write_text(json.dumps(summary_doc, indent=2) + "\n")
    print(f"\npeers: {args.preset}, {args.views} views, {args.dtype}, {args.device}; wall {summary_doc['wall_s']} s")
    print(render(results, checks, args.slo_ms))
    print(f"\nresults: {out}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
