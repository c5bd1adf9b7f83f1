"""``python -m vlaserve.mps_check`` (``make mps-check``): which MPS thread percentages give right answers here.

It starts the MPS control daemon (or uses the one already running on the same pipe directory; one daemon
serves every GPU), then, on each GPU you serve from (``--gpus``; default: every visible one) and for each
thread percentage (the spec's own and a grid), starts a child process on that GPU with
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` set before its CUDA context exists, which:

- reads the SM count its context got and the bf16 matmul rate of its share;
- screens every matrix product the exported encoder and decoder run at their configured batch sizes
  (serving dtype against float32 on the device, :func:`vlaserve.value_check.screen_products`);
- runs the export's golden samples through the TorchScript artifacts (unless ``--no-golden``).

It prints a table (GPU, percentage, SMs, right or wrong with the worst error, TFLOP/s) and writes JSON
(default ``.vlaserve/mps-check.json``, where the server's instances read the safe percentages from, to
name them when one refuses to load). A percentage counts as safe only if it was right on every GPU checked.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vlaserve import interface as io
from vlaserve import repository, value_check
from vlaserve.errors import VlaserveError
from vlaserve.manifest import manifest_path, read_manifest
from vlaserve.params import RunnerParams

GRID = (10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 100)
RESULT_PREFIX = "MPS_CHECK_RESULT "
MPS_CONTROL = "nvidia-cuda-mps-control"


def log(msg: str) -> None:
    print(f"[mps-check] {msg}", flush=True)


def spec_percentages(spec_path: Path) -> set[int]:
    """Every mps_thread_percentage the spec (any variant) asks for."""
    import yaml

    found: set[int] = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("mps_thread_percentage"), int):
                found.add(node["mps_thread_percentage"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    if spec_path.is_file():
        walk(yaml.safe_load(spec_path.read_text()))
    return found


def served_batches(repo: Path, model: str) -> list[int]:
    """The batch sizes the repository's config runs ``model`` at: its buckets, else 1 and the maximum."""
    config = repository.read_config(repo / model / repository.CONFIG_FILE)
    buckets = RunnerParams.of_model_config(config).batch_buckets
    return sorted(buckets) or sorted({1, max(1, config.max_batch_size)})


# ---- one percentage (child process) -------------------------------------------------------------------
def model_products(repo: Path, cache_dir: Path | None = None) -> dict[str, list[dict]]:
    """Every product each model runs at its configured batch sizes (meta device: no CUDA context here), kept in
    ``cache_dir`` as the server's instances keep theirs (so neither records what the other did)."""
    return {
        model: value_check.cached_products(read_manifest(repo, model), served_batches(repo, model), cache_dir)
        for model in repository.RUNNER_MODELS
    }


def check_share(repo: Path, golden: bool, device: str = "cuda:0", products: dict | None = None) -> dict:
    """Run in a child whose CUDA_MPS_ACTIVE_THREAD_PERCENTAGE was set before any CUDA call (``device`` cpu:
    the same checks without a GPU, for tests)."""
    import torch

    on_gpu = device.startswith("cuda")
    row = {"sm_count": 0, "gpu": "cpu", "tflops": 0.0}
    if on_gpu:
        torch.cuda.set_device(device)
        props = torch.cuda.get_device_properties(device)
        row = {"sm_count": props.multi_processor_count, "gpu": props.name}
        row["tflops"] = value_check.matmul_tflops(torch, device)
    for model in repository.RUNNER_MODELS:
        version_dir = repo / model / "1"
        manifest = read_manifest(repo, model)
        batches = served_batches(repo, model)
        screened = (products or {}).get(model) or value_check.record_products(manifest, batches)
        row[f"{model}_products"] = value_check.screen_products(screened, manifest.dtype, device)
        if golden:
            from vlaserve.runtimes import load_runtime

            runtime = load_runtime("torchscript", version_dir, list(manifest.outputs), device)

            def run(inputs, runtime=runtime):
                out = runtime.run(inputs)
                if on_gpu:
                    torch.cuda.synchronize(device)
                return out

            row[f"{model}_golden"] = value_check.check_golden(run, value_check.load_golden(version_dir), batches,
                                                              manifest.dtype)  # fmt: skip
            runtime = None
            if on_gpu:
                torch.cuda.empty_cache()
    checks = [v for k, v in row.items() if k.endswith(("_products", "_golden"))]
    row["right"] = all(value_check.passed(c) for c in checks)
    worst = max(checks, key=lambda c: c["worst"] / c["tolerance"])
    row["worst"] = {"error": worst["worst"], "tolerance": worst["tolerance"], "where": worst["where"]}
    return row


# ---- the sweep ----------------------------------------------------------------------------------------
class MpsDaemon:
    """The MPS control daemon on ``pipe_dir``: the running one if it answers, else one started here."""

    def __init__(self, workdir: Path):
        self.pipe_dir = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or workdir / "mps-pipe")
        self.log_dir = Path(os.environ.get("CUDA_MPS_LOG_DIRECTORY") or workdir / "mps-log")
        self.workdir = workdir
        self.sidecar = None

    def env(self) -> dict[str, str]:
        return {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir), "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir)}

    def answers(self) -> bool:
        try:
            done = subprocess.run([MPS_CONTROL], input="get_server_list\n", capture_output=True, text=True,
                                  env={**os.environ, **self.env()}, timeout=10)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0

    def start(self) -> str:
        control = self.pipe_dir / "control"
        if control.exists():
            owner = control.stat().st_uid
            if owner != os.geteuid():
                raise VlaserveError(
                    "MPS daemon", f"{control} owned by uid {owner}",
                    f"a daemon of this user (uid {os.geteuid()}): quit it, or set CUDA_MPS_PIPE_DIRECTORY to another folder",
                )  # fmt: skip
            if self.answers():
                return f"using the running MPS daemon on {self.pipe_dir}"
        from vlaserve.server import MpsSidecar

        self.sidecar = MpsSidecar(self.workdir)
        self.sidecar.pipe_dir, self.sidecar.log_dir = self.pipe_dir, self.log_dir
        self.sidecar.start()
        return f"started the MPS daemon on {self.pipe_dir}"

    def stop(self) -> None:
        if self.sidecar is not None:
            self.sidecar.stop()


def preflight(repo: Path, golden: bool = True) -> list[int]:
    """Every reason this cannot run, as one VlaserveError; returns each visible GPU's full SM count."""
    for model in repository.RUNNER_MODELS:
        if not manifest_path(repo, model).is_file():
            raise VlaserveError("--repository", str(repo), "an exported model repository (run `make export`)")
    from vlaserve.server import gpu_sm_counts

    total = gpu_sm_counts()
    if not total:
        raise VlaserveError(
            "GPU", "none visible (torch.cuda.is_available() is False)",
            "a CUDA GPU: mps-check measures the MPS thread percentages of the GPU you serve from",
        )  # fmt: skip
    if not shutil.which(MPS_CONTROL):
        raise VlaserveError(
            "MPS", f"{MPS_CONTROL} not on PATH",
            "the NVIDIA driver's MPS binaries (on many hosts in /usr/local/nvidia/bin: add it to PATH)",
        )  # fmt: skip
    if os.geteuid() != 0:
        raise VlaserveError("user", f"uid {os.geteuid()}", "root: the MPS control daemon is run as root here")
    traced = read_manifest(repo, repository.RUNNER_MODELS[0]).init_device
    if golden and traced != "cuda":
        raise VlaserveError(
            "--repository", f"{repo} (exported on {traced})",
            "an export for the GPU (make export ... VARIANT=gpu ARGS=\"--device cuda\"), or --no-golden",
        )  # fmt: skip
    return total


def run_share(args, daemon: MpsDaemon, percentage: int, products_file: Path, gpu: int = 0) -> dict:
    cmd = [sys.executable, "-m", "vlaserve.mps_check", "--child", "--repository", str(args.repository),
           "--child-products", str(products_file), "--child-device", f"cuda:{gpu}"]  # fmt: skip
    if args.no_golden:
        cmd.append("--no-golden")
    env = {**os.environ, **daemon.env(), "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(percentage)}
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"gpu_id": gpu, "percentage": percentage, "right": False,
                "error": f"no answer within --timeout {args.timeout:g} s"}  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"gpu_id": gpu, "percentage": percentage, "right": False,
                "error": f"child exited {done.returncode}: {tail[0]}"}  # fmt: skip
    row = {"gpu_id": gpu, "percentage": percentage, **json.loads(lines[-1][len(RESULT_PREFIX) :])}
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def format_table(rows: list[dict]) -> str:
    lines = [
        f"{'GPU':>3}  {'percentage':>10}  {'SMs':>4}  {'expected':>8}  {'TFLOP/s':>7}  {'answers':<7}  "
        "worst error (tolerance) where"
    ]
    for r in rows:
        gpu = r.get("gpu_id", 0)
        if "error" in r:
            lines.append(f"{gpu:>3}  {r['percentage']:>10}  {'-':>4}  {'-':>8}  {'-':>7}  {'ERROR':<7}  {r['error']}")
            continue
        w = r["worst"]
        lines.append(
            f"{gpu:>3}  {r['percentage']:>10}  {r['sm_count']:>4}  {r.get('expected_sm_count', '-'):>8}  "
            f"{r['tflops']:>7.1f}  {'right' if r['right'] else 'WRONG':<7}  "
            f"{w['error']:.3g} ({w['tolerance']:g}) {w['where']}"
        )
    return "\n".join(lines)


def safe_on_every_gpu(rows: list[dict]) -> list[int]:
    """The percentages whose answers were right on every GPU checked (a share is safe for the spec only then:
    its instances may land on any of them)."""
    gpus = {r.get("gpu_id", 0) for r in rows}
    right = [{r["percentage"] for r in rows if r.get("right") and r.get("gpu_id", 0) == g} for g in gpus]
    return sorted(set.intersection(*right)) if right else []


def sweep(args) -> dict:
    from vlaserve.runner import expected_sm_count

    repo = Path(args.repository)
    totals = preflight(repo, golden=not args.no_golden)
    gpus = args.gpus if args.gpus is not None else list(range(len(totals)))
    absent = [g for g in gpus if g >= len(totals)]
    if absent:
        raise VlaserveError("--gpus", ",".join(map(str, gpus)), f"GPU ids below {len(totals)} (the GPUs visible here)")
    percentages = sorted(set(args.percentages) | spec_percentages(repo / repository.SPEC_FILE))
    workdir = Path(args.workdir).resolve()
    log(f"recording the products of the {' and '.join(repository.RUNNER_MODELS)} at their configured batch sizes ...")
    products = model_products(repo, workdir / value_check.PRODUCTS_CACHE)  # shared with the server in this workdir
    products_file = workdir / "mps-check-products.json"
    products_file.parent.mkdir(parents=True, exist_ok=True)
    products_file.write_text(json.dumps(products))
    log(
        f"{sum(map(len, products.values()))} products; percentages {', '.join(map(str, percentages))}; "
        f"GPU {', '.join(map(str, gpus))}"
    )
    daemon = MpsDaemon(workdir)  # one MPS daemon serves every GPU
    rows = []
    try:
        log(daemon.start())
        for gpu in gpus:
            for pct in percentages:
                row = run_share(args, daemon, pct, products_file, gpu)
                row["expected_sm_count"] = expected_sm_count(pct, totals[gpu])
                rows.append(row)
                at = f"GPU {gpu}, {pct:3d} %"
                if "error" in row:
                    log(f"{at}: {row['error']}")
                else:
                    worst = row["worst"]
                    verdict = "right" if row["right"] else f"WRONG ({worst['error']:.3g} at {worst['where']})"
                    log(f"{at}: {row['sm_count']} SMs, {row['tflops']} TFLOP/s, {verdict} ({row['seconds']} s)")
    finally:
        daemon.stop()
    gpu = next((r["gpu"] for r in rows if "gpu" in r), "unknown")
    manifest = read_manifest(repo, repository.RUNNER_MODELS[0])
    return {
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "gpu": gpu,
        "total_sms": totals[gpus[0]] if gpus else None,
        "gpus": gpus,
        "repository": str(repo.resolve()),
        "model": value_check.model_key(manifest.settings),
        "golden": not args.no_golden,
        "safe": safe_on_every_gpu(rows),
        "rows": rows,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vlaserve.mps_check", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repository", default="model_repository", help="an exported repository (default: model_repository)"
    )
    parser.add_argument("--percentages", default=",".join(map(str, GRID)),
                        help="thread percentages to try, besides the spec's own (default: %(default)s)")  # fmt: skip
    parser.add_argument("--no-golden", action="store_true", help="screen the products only (no artifact loads: faster)")
    parser.add_argument(
        "--workdir", default=io.DEFAULT_WORKDIR, help="MPS pipes and logs, as the server's (default: .vlaserve)"
    )
    parser.add_argument("--out", help=f"the JSON report (default: <workdir>/{value_check.MPS_CHECK_FILE})")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per percentage (default: 300)")
    parser.add_argument(
        "--gpus", help="GPU ids to check, e.g. 0,1 (default: every visible GPU); a percentage is safe if right on all"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-device", default="cuda:0", help=argparse.SUPPRESS)
    parser.add_argument("--child-products", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.percentages = {int(p) for p in args.percentages.split(",") if p}
    except ValueError:
        parser.error(f"--percentages: got {args.percentages!r}, expected integers in 1..100, e.g. 25,50,100")
    if not all(1 <= p <= 100 for p in args.percentages):
        parser.error(f"--percentages: got {sorted(args.percentages)}, expected integers in 1..100")
    if args.gpus is not None:
        try:
            args.gpus = sorted({int(g) for g in args.gpus.split(",") if g.strip()})
        except ValueError:
            args.gpus = []
        if not args.gpus or min(args.gpus) < 0:
            parser.error("--gpus: expected GPU ids, e.g. 0 or 0,1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(
            RESULT_PREFIX
            + json.dumps(
                check_share(
                    Path(args.repository),
                    not args.no_golden,
                    args.child_device,
                    json.loads(Path(args.child_products).read_text()) if args.child_products else None,
                )
            ),
            flush=True,
        )
        return 0
    try:
        report = sweep(args)
    except (VlaserveError, RuntimeError) as exc:  # RuntimeError: the MPS daemon did not start (the line above)
        print(f"mps-check: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out or Path(args.workdir) / value_check.MPS_CHECK_FILE)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\nmps-check: {report['gpu']} ({report['total_sms']} SMs), GPU {', '.join(map(str, report['gpus']))}, "
        f"{io.ENCODER} and {io.DECODER} of {args.repository}"
    )
    print(format_table(report["rows"]))
    print(f"\nright at: {', '.join(map(str, report['safe'])) or 'none'}   report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
