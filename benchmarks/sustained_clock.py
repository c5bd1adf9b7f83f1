"""Does a CUDA-graph replay take as long under sustained load as when the GPU has rested? Per model, at one
batch bucket: replays spaced by an idle gap, then replays back to back for a while, each timed with CUDA
events, with the SM clock and power of the GPU in use (cuda:0, named to nvidia-smi by its UUID) sampled
through the back-to-back phase, and the energy the GPU used over the phase's last 5 s (NVML's energy
counter): joules per replay and per answer. The graph's answers are checked against the export's golden samples
first, and a graph that fails them is not timed (``--blas cublaslt`` asks torch for cuBLASLt's products
instead of cuBLAS's before anything is compiled or captured). Needs a CUDA GPU.

With the encoder and the decoder at the same bucket, the table ends with what the pipeline's graphs allow at
that bucket: answers a second with one graph after the other at the times measured, and what the GPU's
enforced power limit allows at the energy measured per answer (work overlapped on the GPU, by streams,
instances or MPS, still spends about that energy per answer).

    python -m benchmarks.sustained_clock --repository /tmp/pi0_repo --batch 16 --seconds 15 --out $OUT/clock.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import threading
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


def sustained(graph, seconds: float) -> tuple[float, list[tuple[float, float]]]:
    """Replays back to back for ``seconds``: when the phase began (perf_counter s), and (seconds since then,
    replay ms) for each replay."""
    times, began = [], time.perf_counter()
    while (now := time.perf_counter() - began) < seconds:
        times.append((now, timed(graph)))
    return began, times


class EnergyCounter:
    """One GPU's energy counter (NVML's total energy since the driver loaded, mJ) and enforced power limit,
    through ctypes from libnvidia-ml.so.1, which comes with the driver. In the block a thread reads the counter
    every ``interval_s`` and keeps each new value with the time it was first seen (the counter moves every 20
    to 100 ms), so that :meth:`mean_watts` can take a window between two of its own steps. Without NVML, or for
    a GPU it does not know, ``available`` is False and every figure is None."""

    LIBRARIES = ("libnvidia-ml.so.1", "/usr/local/nvidia/lib64/libnvidia-ml.so.1", "/usr/lib64/libnvidia-ml.so.1")

    def __init__(self, uuid: str, interval_s: float = 0.002, libraries: tuple[str, ...] = LIBRARIES):
        self.lib, self.handle, self.interval_s = None, ctypes.c_void_p(), interval_s
        self.steps: list[tuple[float, float]] = []  # (perf_counter s, joules) where the counter moved
        self.stop, self.thread = threading.Event(), None
        for library in libraries:
            try:
                lib = ctypes.CDLL(library)
            except OSError:
                continue
            if lib.nvmlInit_v2() == 0 and lib.nvmlDeviceGetHandleByUUID(uuid.encode(), ctypes.byref(self.handle)) == 0:
                self.lib = lib
            break

    @property
    def available(self) -> bool:
        return self.lib is not None and self.joules() is not None

    def joules(self) -> float | None:
        mj = ctypes.c_ulonglong()
        if self.lib is None or self.lib.nvmlDeviceGetTotalEnergyConsumption(self.handle, ctypes.byref(mj)):
            return None
        return mj.value / 1e3

    def limit_watts(self) -> float | None:
        mw = ctypes.c_uint()
        if self.lib is None or self.lib.nvmlDeviceGetEnforcedPowerLimit(self.handle, ctypes.byref(mw)):
            return None
        return mw.value / 1e3

    def __enter__(self):
        if self.available:
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        last = None
        while not self.stop.is_set():
            value = self.joules()
            if value is not None and value != last:
                self.steps.append((time.perf_counter(), value))
                last = value
            self.stop.wait(self.interval_s)

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread is not None:
            self.thread.join()

    def mean_watts(self, low: float, high: float) -> dict | None:
        """The mean power between the counter's first and last steps seen within [low, high) (perf_counter
        seconds): {"watts", "seconds" it spans, "steps"}; None with fewer than two steps there."""
        return mean_watts(self.steps, low, high)


def mean_watts(steps: list[tuple[float, float]], low: float, high: float) -> dict | None:
    """From (time s, joules) steps of an energy counter: the mean power between the first and the last step
    within [low, high), the span they cover and how many steps fell there; None with fewer than two."""
    inside = [(t, j) for t, j in steps if low <= t < high]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return None
    (t0, j0), (t1, j1) = inside[0], inside[-1]
    return {"watts": round((j1 - j0) / (t1 - t0), 1), "seconds": round(t1 - t0, 3), "steps": len(inside)}


def pipeline_ceilings(rows: list[dict]) -> list[dict]:
    """Per bucket with an encoder and a decoder row (each with its last-5-s replay ms and, where measured, its
    joules per answer): answers a second with the two graphs one after the other at those times, and the most
    that the GPU's power limit allows at that energy per answer (the limit / joules per answer)."""
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        at = {r["model"]: r for r in rows if r["batch"] == batch}
        enc, dec = at.get("encoder"), at.get("decoder")
        if not enc or not dec or enc["last_5s_ms"] is None or dec["last_5s_ms"] is None:
            continue
        row = {"batch": batch, "graphs_ms": round(enc["last_5s_ms"] + dec["last_5s_ms"], 2)}
        row["in_turn_per_s"] = round(1000 * batch / row["graphs_ms"], 1)
        energy = [r.get("energy") or {} for r in (enc, dec)]
        if all(e.get("j_per_answer") for e in energy) and energy[0].get("limit_w"):
            row["j_per_answer"] = round(sum(e["j_per_answer"] for e in energy), 3)
            row["limit_w"] = energy[0]["limit_w"]
            row["power_limit_per_s"] = round(row["limit_w"] / row["j_per_answer"], 1)
        out.append(row)
    return out


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


def prepared(repo: Path, name: str, batch: int, inductor: dict | None = None) -> tuple:
    """``name``'s runtime on cuda:0 as a served GPU instance of the repository's config has it (compiled, with
    its fused kernels and fp8 products where the config asks, one CUDA graph at ``batch``), checked against
    its golden samples: (runtime, the graph, the golden check, the manifest). ``inductor``: settings over
    the layers' own, to compare them (vlaserve.runtimes.compile_layers)."""
    folder, params = served_step(repo, name)
    manifest = Manifest.read(folder / io.MANIFEST_FILE)
    runtime = load_runtime("torchscript", folder, list(manifest.outputs), "cuda:0")
    runtime.fused_kernels, runtime.precision = params.fused_kernels, params.precision
    runtime.compile_overrides = dict(inductor or {})
    why_not = runtime.compile(manifest, batch=batch)
    if why_not:
        raise SystemExit(f"{name}: not compiled ({why_not}): the served runtime would differ")
    print(f"{name}: compiled", flush=True)
    why_not = runtime.capture_graphs([batch], manifest.inputs)
    if why_not:
        raise SystemExit(f"{name}: no CUDA graph at batch {batch}: {why_not}")
    dtype = judged_as(manifest.dtype, runtime.precision)  # as the runner judges it (fp8 at its own tolerance)
    return runtime, runtime.graphs.graphs[batch][0], checked(name, runtime, folder, batch, dtype), manifest


def inductor_setting(item: str) -> tuple:
    """An --inductor item, KEY=VALUE -> (key, True, False or int)."""
    key, sep, value = item.partition("=")
    words = {"True": True, "False": False}
    if not sep or not key or not (value in words or value.lstrip("-").isdigit()):
        raise ValueError(f"--inductor {item!r}: KEY=VALUE with VALUE True, False or an int")
    return key, words[value] if value in words else int(value)


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
    parser.add_argument(
        "--inductor",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an Inductor setting over the layers' own (True, False or an int), e.g. comprehensive_padding=True",
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    try:
        inductor = dict(inductor_setting(item) for item in args.inductor)
    except ValueError as exc:
        parser.error(str(exc))
    if args.spaced < 1 or args.seconds < 5:
        parser.error("--spaced needs at least 1 replay and --seconds at least 5 (the last 5 s are a window)")
    repo, rows = Path(args.repository), []
    torch.backends.cuda.preferred_blas_library(args.blas)
    for i, name in enumerate(args.models.split(",")):
        if i:
            time.sleep(args.gap * 5)  # the next model starts from a rested GPU too
        setup_began = time.perf_counter()
        runtime, graph, golden, manifest = prepared(repo, name, args.batch, inductor)
        setup_s = round(time.perf_counter() - setup_began, 1)  # compiling (with any autotuning), capture, check
        for _ in range(3):
            timed(graph)
        rest = spaced(graph, args.spaced, args.gap)
        uuid = f"GPU-{torch.cuda.get_device_properties(0).uuid}"  # cuda:0's own GPU
        energy = EnergyCounter(uuid)
        if not energy.available:
            print(f"{name}: no energy figures: NVML's energy counter cannot be read here", flush=True)
        with GpuClocks(gpu=uuid) as clocks, energy:
            began, load = sustained(graph, args.seconds)
        last_5s_ms = median_between(load, args.seconds - 5, args.seconds)
        power = energy.mean_watts(began + args.seconds - 5, began + args.seconds)
        spent = {"limit_w": energy.limit_watts()}
        if power and last_5s_ms:
            spent.update(power, j_per_replay=round(power["watts"] * last_5s_ms / 1e3, 3))
            spent["j_per_answer"] = round(spent["j_per_replay"] / args.batch, 3)
        row = {
            "model": name, "batch": args.batch, "prompt_tokens": manifest.prompt_tokens, "blas": args.blas, "inductor": inductor, "attention": runtime.graphs.chosen[args.batch],
            "golden": golden, "setup_s": setup_s,
            "spaced_ms": [round(ms, 3) for ms in rest], "spaced_median_ms": round(statistics.median(rest), 3),
            "replays": len(load), "first_second_ms": median_between(load, 0, 1),
            "last_5s_ms": last_5s_ms, "clocks": clocks.summary(), "energy": spent,
            "per_second_ms": [median_between(load, s, s + 1) for s in range(int(args.seconds))],
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
        runtime = graph = None
        torch.cuda.empty_cache()
    ceilings = pipeline_ceilings(rows)
    if ceilings:  # after the models' rows, one per bucket, named as the pair
        Path(args.out).write_text(json.dumps(rows + [{"model": "encoder+decoder", **p} for p in ceilings], indent=2))
    print(
        f"\n{'model':8} {'batch':>5} {'blas':>8} {'golden':>7} {'rested ms':>10} {'first s ms':>11} {'last 5 s ms':>12} "
        f"{'SM MHz med/min':>15} {'W med':>6} {'W mean':>7} {'J/answer':>9} {'setup s':>8}"
    )
    for r in rows:
        c, e = r["clocks"], r["energy"]
        print(
            f"{r['model']:8} {r['batch']:5d} {r['blas']:>8} {r['golden']['worst']:7.4f} "
            f"{r['spaced_median_ms']:10.2f} {shown(r['first_second_ms'], 11)} "
            f"{shown(r['last_5s_ms'], 12)} {c.get('sm_mhz_median', 0):7.0f}/{c.get('sm_mhz_min', 0):<7.0f} {c.get('power_w_median', 0):6.0f} "
            f"{shown(e.get('watts'), 7)} {shown(e.get('j_per_answer'), 9)} {r['setup_s']:8.1f}"
        )
    for p in ceilings:
        limit = (
            f"; at the {p['limit_w']:.0f} W limit and {p['j_per_answer']:.3f} J an answer at most "
            f"{p['power_limit_per_s']:.1f}/s"
            if "power_limit_per_s" in p
            else ""
        )
        print(f"bucket {p['batch']}: graphs in turn {p['graphs_ms']:.2f} ms, {p['in_turn_per_s']:.1f} answers/s{limit}")


if __name__ == "__main__":
    main()
