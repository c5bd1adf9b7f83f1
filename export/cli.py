"""``python -m export``: build the policy, export encoder and decoder, check parity, fill the model repository.

Nothing is written into the repository until every artifact has passed its parity check: the work
happens in a staging folder inside the repository and is moved into place at the end.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from export import artifacts
from export.checkpoint import check_config, load_checkpoint, weights_file
from vlaserve import interface as io
from vlaserve import value_check
from vlaserve.errors import VlaserveError
from vlaserve.manifest import Manifest, ModelSettings, TensorSpec
from vlaserve.model.parity import REL_TOLERANCE, compare, random_request
from vlaserve.model.policy import STAGES, build_policy
from vlaserve.model.presets import PRESETS, get_preset

TORCH_DTYPES = {name: getattr(torch, dtype) for name, dtype in value_check.TORCH_DTYPE.items()}


def log(msg: str) -> None:
    print(f"[export] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export the pi0-style encoder and decoder to ONNX and TorchScript, check them against "
        "PyTorch, and place them in the model repository.",
    )
    parser.add_argument("--preset", default="tiny", help=f"model size: one of {', '.join(PRESETS)} (default: tiny)")
    parser.add_argument("--views", default="2", help="camera views per request, 1-3 (default: 2)")
    parser.add_argument(
        "--prompt-tokens",
        default=str(io.MAX_TOKENS),
        help=f"prompt positions the encoder computes on, 1-{io.MAX_TOKENS} (default: {io.MAX_TOKENS}, all the request "
        "carries); fewer make every request cheaper, and a longer prompt is refused",
    )
    parser.add_argument("--dtype", default="fp32", help="fp32 (CPU), fp16 or bf16 (GPU; bf16 is TorchScript only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.add_argument(
        "--checkpoint",
        help="pi0 weights: a .safetensors file, or a folder holding model.safetensors (LeRobot's PI0Policy, "
        "openpi's PyTorch pi0, or this project's own layout)",
    )
    parser.add_argument("--repository", default="model_repository", help="model repository (default: model_repository)")
    parser.add_argument("--spec", help="repository spec (default: <repository>/spec.yaml)")
    parser.add_argument("--variant", help="write the configs of this spec variant (e.g. gpu); default: the spec itself")
    parser.add_argument("--device", default="cpu", help="where PyTorch runs for tracing and parity: cpu or cuda")
    parser.add_argument("--parity-batches", default="1,4", help="batch sizes of the parity check (default: 1,4)")
    return parser.parse_args(argv)


def validate(args: argparse.Namespace):
    """Check every flag before any work starts; returns (config, dtype, device, batches)."""
    try:
        views = int(args.views)
    except ValueError:
        raise VlaserveError("--views", args.views, f"an integer in 1..{io.MAX_VIEWS}") from None
    if args.preset not in PRESETS:
        raise VlaserveError("--preset", args.preset, f"one of {', '.join(PRESETS)}")
    if not 1 <= views <= io.MAX_VIEWS:
        raise VlaserveError("--views", views, f"an integer in 1..{io.MAX_VIEWS}")
    try:
        prompt_tokens = int(args.prompt_tokens)
    except ValueError:
        prompt_tokens = 0
    if not 1 <= prompt_tokens <= io.MAX_TOKENS:
        raise VlaserveError("--prompt-tokens", args.prompt_tokens, f"an integer in 1..{io.MAX_TOKENS}")
    cfg = get_preset(args.preset, views, prompt_tokens)
    if args.dtype not in TORCH_DTYPES:
        raise VlaserveError("--dtype", args.dtype, f"one of {', '.join(TORCH_DTYPES)}")
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        raise VlaserveError("--device", args.device, "cpu, or cuda on a machine with a CUDA GPU")
    try:
        batches = [int(b) for b in args.parity_batches.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise VlaserveError("--parity-batches", args.parity_batches, "comma-separated positive integers, e.g. 1,4")
    repo = Path(args.repository)
    if not repo.is_dir():
        raise VlaserveError("--repository", str(repo), "an existing model repository folder")
    if args.checkpoint:
        weights_file(Path(args.checkpoint))
        check_config(Path(args.checkpoint), views)
    return cfg, TORCH_DTYPES[args.dtype], torch.device(args.device), batches


def check_parity(name: str, fmt: str, produced, expected, dtype: str) -> dict:
    """Compare each output of an artifact with PyTorch's; raise when over the dtype's tolerance."""
    figures = {}
    for out_name, got, ref in zip(expected.keys(), produced, expected.values()):
        if ref.dtype == torch.bool:
            same = bool(np.array_equal(np.asarray(torch.as_tensor(got).cpu()), ref.cpu().numpy()))
            figures[out_name] = {"equal": same}
            if not same:
                raise VlaserveError(f"{name}.{fmt}.{out_name}", "mismatch", "the same mask as PyTorch")
            continue
        figures[out_name] = err = compare(got, ref)
        if not err["rel"] <= REL_TOLERANCE[dtype]:
            raise VlaserveError(
                f"{name}.{fmt}.{out_name} parity",
                f"rel {err['rel']:.2e}, max-abs {err['max_abs']:.2e}",
                f"rel <= {REL_TOLERANCE[dtype]:.0e} for {dtype}",
            )
    return figures


def export_model(name, module, make_inputs, input_names, output_names, formats, dtype, batches, out_dir: Path):
    """Export one model in every format and check parity at each batch size.

    Returns the files, parity figures and timings per format, and the tensor specs (names, dtypes,
    per-item shapes) of the inputs and outputs as the parity run saw them, for the manifest."""
    out_dir.mkdir(parents=True)
    files, parity, timings = {}, {}, {}
    example = make_inputs(2, seed=0)
    if tuple(example) != tuple(input_names):  # the pipeline step declares the order the artifact takes them in
        raise VlaserveError(f"{name} example inputs", list(example), f"the step's inputs in order, {list(input_names)}")
    for fmt in formats:
        log(f"{name}: exporting {fmt} ...")
        start = time.perf_counter()
        files[fmt] = artifacts.exporter(fmt).write(module, tuple(example.values()), input_names, output_names, out_dir)
        timings[fmt] = round(time.perf_counter() - start, 2)
        log(f"{name}: {fmt} written in {timings[fmt]:.1f} s")
    for batch in batches:
        inputs = make_inputs(batch, seed=1000 + batch)
        with torch.no_grad():
            ref = module(*inputs.values())
        ref = dict(zip(output_names, ref if isinstance(ref, tuple) else (ref,)))
        for fmt in formats:
            produced = artifacts.exporter(fmt).run(out_dir, inputs)
            figures = check_parity(name, fmt, produced, ref, dtype)
            parity.setdefault(fmt, {})[f"batch_{batch}"] = figures
            shown = ", ".join(
                f"{k} max-abs {v['max_abs']:.2e} rel {v['rel']:.2e}" for k, v in figures.items() if "rel" in v
            )
            log(f"{name}: {fmt} parity at batch {batch}: {shown}")
    golden_inputs = make_inputs(value_check.GOLDEN_ITEMS, seed=value_check.GOLDEN_SEED)
    with torch.no_grad():
        golden_out = module(*golden_inputs.values())
    golden_out = dict(zip(output_names, golden_out if isinstance(golden_out, tuple) else (golden_out,)))
    value_check.write_golden(out_dir, golden_inputs, golden_out)
    log(f"{name}: golden sample ({value_check.GOLDEN_ITEMS} requests) written for the serving-time value check")
    return files, parity, timings, {"inputs": tensor_spec(inputs), "outputs": tensor_spec(ref)}


def tensor_spec(tensors: dict[str, torch.Tensor]) -> dict:
    """{name: {dtype, shape with -1 batch}} for a manifest."""
    return {k: TensorSpec(str(v.dtype).removeprefix("torch."), (-1, *v.shape[1:])) for k, v in tensors.items()}


def run(args: argparse.Namespace) -> Path:
    cfg, dtype, device, batches = validate(args)
    from vlaserve import repository  # the spec is read (and checked) before any model work starts

    repo = Path(args.repository)
    spec = repository.load_spec(Path(args.spec) if args.spec else repo / repository.SPEC_FILE, args.variant)
    if spec.one_model:  # its repository holds no step models: it is written beside the export, not into it
        raise VlaserveError(
            "--variant",
            args.variant,
            "a variant whose policy is an ensemble: export with one (or none), then serve a one_model variant with "
            f"make serve VARIANT={args.variant} (or python -m vlaserve.repository --variant {args.variant} --out DIR)",
        )
    formats = artifacts.formats_for(args.dtype)
    repository.check_runtimes(spec, formats)
    started = time.perf_counter()
    log(
        f"building the {cfg.name} policy ({cfg.views} views, {cfg.prompt_tokens} prompt tokens, {args.dtype}, "
        f"seed {args.seed}) ..."
    )
    policy = build_policy(cfg, seed=args.seed, device=str(device))
    if args.checkpoint:
        layout = load_checkpoint(policy, args.checkpoint)
        log(f"loaded {args.checkpoint} ({layout} layout)")
    policy = policy.to(dtype=dtype)
    n_params = sum(p.numel() for p in policy.parameters())
    log(f"{n_params / 1e6:.1f} M parameters")

    def example_inputs(step):
        def make(batch, seed):
            request = {
                k: v.to(device)
                for k, v in random_request(batch, cfg.views, cfg.vocab_size, seed, cfg.prompt_tokens).items()
            }
            return dict(zip(step.inputs, STAGES[step.model].example_inputs(policy, request)))

        return make

    # each step of the pipeline: its module (vlaserve.model.policy.STAGES), example inputs and tensor names
    models = {
        step.model: (STAGES[step.model](policy), example_inputs(step), step.inputs, step.outputs)
        for step in io.PIPELINE
    }
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=repo))
    try:
        for name, (module, make_inputs, input_names, output_names) in models.items():
            files, parity, timings, tensors = export_model(
                name, module, make_inputs, input_names, output_names, formats, args.dtype, batches, staging / name
            )
            manifest = Manifest(
                model=name,
                preset=cfg.name,
                views=cfg.views,
                dtype=args.dtype,
                prompt_tokens=cfg.prompt_tokens,
                seed=args.seed,
                init_device=device.type,
                checkpoint=args.checkpoint,
                vocab_size=cfg.vocab_size,
                parameters=n_params,
                **tensors,
                artifacts={
                    fmt: {
                        f: {
                            "bytes": (staging / name / f).stat().st_size,
                            "sha256": artifacts.sha256(staging / name / f),
                        }
                        for f in fs
                    }
                    for fmt, fs in files.items()
                },
                golden={
                    "file": io.GOLDEN_FILE,
                    "items": value_check.GOLDEN_ITEMS,
                    "sha256": artifacts.sha256(staging / name / io.GOLDEN_FILE),
                },
                parity=parity,
                export_seconds=timings,
                torch=torch.__version__,
            )
            manifest.write(staging / name / io.MANIFEST_FILE)
        # Everything passed: move the artifacts into place, then write the configs that describe them.
        for name in models:
            version_dir = repo / name / "1"
            version_dir.mkdir(parents=True, exist_ok=True)
            for stale in (*artifacts.all_files(), io.GOLDEN_FILE, io.MANIFEST_FILE):
                (version_dir / stale).unlink(missing_ok=True)
            for f in (staging / name).iterdir():
                f.replace(version_dir / f.name)
        repository.write_repository(spec, repo, ModelSettings(cfg.name, cfg.views, args.dtype, cfg.prompt_tokens))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"done in {time.perf_counter() - started:.1f} s: {repo}/{{{io.ENCODER},{io.DECODER}}}/1 and configs")
    return repo


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except VlaserveError as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    return 0
