"""The model repository, generated from one declarative spec (``model_repository/spec.yaml``).

Every ``config.pbtxt`` is built as a ``tritonclient.grpc.model_config_pb2.ModelConfig`` (through
``json_format.ParseDict``) and written with protobuf's ``text_format``; nothing is templated.

``python -m vlaserve.repository`` regenerates the configs of a repository, or writes a variant of it
(for example ``--variant naive``) into another folder whose artifacts link back to the source.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from vlaserve import interface as io
from vlaserve.errors import VlaserveError
from vlaserve.manifest import ModelSettings, read_manifest_settings
from vlaserve.model.presets import get_preset
from vlaserve.params import GroupLimits, RunnerParams
from vlaserve.runtimes import RUNTIMES
from vlaserve.spec import RUNNER_MODELS, Batching, RunnerModel, Spec, load_spec, variant_names

SPEC_FILE = "spec.yaml"
CONFIG_FILE = "config.pbtxt"
MODEL_PY = '"""Triton Python-backend entry point: the shared runner serves this model (see vlaserve.runner)."""\n\nfrom vlaserve.runner import TritonPythonModel  # noqa: F401\n'
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}  # the spec's instance kinds as Triton names them
TYPE_OF_DTYPE = {"fp32": "TYPE_FP32", "fp16": "TYPE_FP16", "bf16": "TYPE_BF16"}


def check_runtimes(spec: Spec, formats) -> None:
    """Every runner model's runtime must have an artifact among ``formats``."""
    for name in RUNNER_MODELS:
        runtime = spec.runners[name].runtime
        if RUNTIMES[runtime].format not in formats:
            raise VlaserveError(
                f"models.{name}.runtime", runtime, f"a runtime for the exported formats {list(formats)}"
            )


def tensor_dims(settings: ModelSettings) -> dict[str, tuple[list[int], str]]:
    """Per-item dims and Triton type of every tensor, for the exported preset, views and dtype."""
    cfg = get_preset(settings.preset, settings.views, settings.prompt_tokens)
    p = cfg.prefix
    shapes = io.request_shapes(settings.views)
    return {
        io.IMAGES: (list(shapes[io.IMAGES]), "TYPE_UINT8"),
        io.TOKENS: (list(shapes[io.TOKENS]), "TYPE_INT32"),
        io.STATE: (list(shapes[io.STATE]), "TYPE_FP32"),
        io.NOISE: (list(shapes[io.NOISE]), "TYPE_FP32"),
        io.PREFIX_KV: ([p.depth, 2, p.num_kv_heads, cfg.prefix_len, p.head_dim], TYPE_OF_DTYPE[settings.dtype]),
        io.PREFIX_MASK: ([cfg.prefix_len], "TYPE_BOOL"),
        io.ACTIONS: ([io.ACTION_HORIZON, io.ACTION_DIM], "TYPE_FP32"),
    }


# {model: (config inputs, outputs)}, from the pipeline (vlaserve.interface.PIPELINE).
MODEL_IO = {
    **{step.model: ((*step.inputs, *step.checks), step.outputs) for step in io.PIPELINE},
    io.POLICY: (io.request_inputs(), io.PIPELINE[-1].outputs),
}
# Every input is declared optional: Triton's ensemble does not check for missing inputs (a request
# without one would end in "unexpected deadlock"), so the runner checks them and names the missing
# one. Only the noise may really be left out (the server then draws it).
# Warm-up data per input: random camera frames; zeros elsewhere (Triton's random_data for floats is
# random bytes, NaN included, which the runner rightly rejects; token id 0 is padding). The noise is
# left to the server.
WARMUP_DATA = {io.IMAGES: "random_data", io.NOISE: None}


def _io_entries(names, dims, optional: bool) -> list[dict]:
    entries = []
    for name in names:
        shape, dtype = dims[name]
        entries.append({"name": name, "data_type": dtype, "dims": shape, **({"optional": True} if optional else {})})
    return entries


def _string_params(values: dict) -> dict:
    return {k: {"string_value": str(v)} for k, v in values.items()}


def admission_params(name: str, spec: Spec) -> dict:
    """The RunnerParams fields of the pipeline's in-flight limit (vlaserve.admission), or none: the first
    model of the pipeline takes a slot per request before it computes, the last gives it back."""
    limit = spec.policy.max_in_flight
    first, last = RUNNER_MODELS[0], RUNNER_MODELS[-1]
    if not limit or name not in (first, last):
        return {}

    def timeout_s(model: str, default: float) -> float:
        timeout = (spec.runners[model].dynamic_batching or Batching()).queue_timeout_microseconds
        return (default * 1e6 if timeout is None else timeout) / 1e6

    params = {"admission_role": "acquire" if name == first else "release", "admission_limit": limit}
    # a slot nobody gives back is lent again after the last model's queue timeout and 10 s more
    params["admission_ttl_s"] = timeout_s(last, 20.0) + 10.0
    if name == first:  # how long a batch waits for room before it is answered UNAVAILABLE
        params["admission_wait_s"] = timeout_s(first, 5.0)
    return params


def runner_params(m: RunnerModel, admission: dict | None = None) -> RunnerParams:
    """The runner parameters of one model of the spec."""
    return RunnerParams(
        runtime=m.runtime,
        cpu_threads=m.cpu_threads,
        noise_seed=m.noise_seed,
        value_check=m.value_check,
        batch_buckets=m.batch_buckets,
        compile=bool(m.compile),
        cuda_graphs=bool(m.cuda_graphs),
        fused_kernels=bool(m.fused_kernels),
        precision=m.precision if m.precision == "fp8" else None,
        groups={
            g.name: GroupLimits(g.mps_thread_percentage, g.mps_pinned_memory_limit_mb)
            for g in m.instance_groups
            if g.mps_thread_percentage is not None or g.mps_pinned_memory_limit_mb is not None
        },
        **(admission or {}),
    )


def host_gpus() -> tuple[int, str]:
    """The GPUs Triton would see here, and where that was read: $CUDA_VISIBLE_DEVICES where set, else
    nvidia-smi's list. 1 where neither names any (a CPU host writing a GPU variant's configs writes them for a
    one-GPU host; the repository command says so)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = len([d for d in visible.split(",") if d.strip()])
        return (count, "$CUDA_VISIBLE_DEVICES") if count else (1, "none in $CUDA_VISIBLE_DEVICES: 1 assumed")
    if shutil.which("nvidia-smi"):
        try:
            listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            listed = ""
        count = sum(line.startswith("GPU ") for line in listed.splitlines())
        return (count, "nvidia-smi -L") if count else (1, "nvidia-smi listed none: 1 assumed")
    return 1, "no nvidia-smi: 1 assumed"


def host_gpu_count() -> int:
    return host_gpus()[0]


def runner_config(
    name: str, m: RunnerModel, dims, admission: dict | None = None, params=None, gpu_count: int = 1
) -> dict:
    """The ModelConfig (as a dict) of a Python-backend model: the encoder or the decoder, or the policy run as
    one model (with ``params``: its steps' parameters; its batching and instances are ``m``'s). A group's
    ``gpus`` are resolved for a host with ``gpu_count`` GPUs."""
    inputs, outputs = MODEL_IO[name]
    params = (params or runner_params(m, admission)).to_config()
    groups = []
    for i, g in enumerate(m.instance_groups):
        group = {"name": g.name, "count": g.count, "kind": KINDS[g.kind]}
        ids = g.device_ids(gpu_count, f"models.{name}.instance_groups[{i}]")
        if ids is not None:
            group["gpus"] = list(ids)
        groups.append(group)
    config = {
        "name": name,
        "backend": "python",
        "max_batch_size": m.max_batch_size,
        "input": _io_entries(inputs, dims, optional=True),
        "output": _io_entries(outputs, dims, optional=False),
        "instance_group": groups,
        "parameters": _string_params(params),
    }
    batching = m.dynamic_batching
    if batching:
        db = {
            "preferred_batch_size": list(batching.preferred_batch_size),
            "max_queue_delay_microseconds": batching.max_queue_delay_microseconds,
        }
        policy = {"timeout_action": "REJECT", "allow_timeout_override": True}
        if batching.max_queue_size is not None:
            policy["max_queue_size"] = batching.max_queue_size
        if batching.queue_timeout_microseconds is not None:
            policy["default_timeout_microseconds"] = batching.queue_timeout_microseconds
        db["default_queue_policy"] = policy
        if batching.priority_levels:
            db["priority_levels"] = batching.priority_levels
            db["default_priority_level"] = batching.default_priority_level
        config["dynamic_batching"] = db
    warmups = []
    for size in m.warmup_batch_sizes:
        warm_inputs = {}
        for input_name in inputs:
            kind = WARMUP_DATA.get(input_name, "zero_data")
            if kind:
                shape, dtype = dims[input_name]
                warm_inputs[input_name] = {"data_type": dtype, "dims": shape, kind: True}
        warmups.append({"name": f"batch_{size}", "batch_size": size, "inputs": warm_inputs, "count": m.warmup_count})
    if warmups:
        config["model_warmup"] = warmups
    return config


def policy_config(spec: Spec, dims) -> dict:
    """The ensemble: the pipeline's steps in order, answering with the last step's outputs."""
    inputs, outputs = MODEL_IO[io.POLICY]
    return {
        "name": io.POLICY,
        "platform": "ensemble",
        "max_batch_size": spec.policy.max_batch_size,
        "input": _io_entries(inputs, dims, optional=True),
        "output": _io_entries(outputs, dims, optional=False),
        "ensemble_scheduling": {
            "step": [
                {
                    "model_name": step.model,
                    "model_version": -1,
                    "input_map": {n: n for n in MODEL_IO[step.model][0]},
                    "output_map": {n: n for n in step.outputs},
                }
                for step in io.PIPELINE
            ]
        },
    }


def one_model_config(spec: Spec, dims, gpu_count: int = 1) -> dict:
    """The policy as one Python-backend model whose instances run every step (spec pipeline one_model):
    batched and placed as the first step says, each step with its own runtime settings."""
    first = spec.runners[RUNNER_MODELS[0]]
    own = runner_params(first)
    params = RunnerParams(
        runtime=first.runtime,
        groups=own.groups,
        steps={name: runner_params(spec.runners[name]) for name in RUNNER_MODELS},
    )
    config = runner_config(io.POLICY, first, dims, params=params, gpu_count=gpu_count)
    config["max_batch_size"] = spec.policy.max_batch_size
    return config


def build_configs(
    spec: Spec, settings: ModelSettings | None = None, gpu_count: int | None = None
) -> dict[str, model_config_pb2.ModelConfig]:
    """Every model's ModelConfig message, for ``settings`` (default: the spec's own ``model:`` section), with
    the instance groups' GPUs resolved for a host with ``gpu_count`` GPUs (default: this host's)."""
    dims = tensor_dims(settings or spec.model)
    gpu_count = gpu_count or host_gpu_count()
    if spec.one_model:
        dicts = {io.POLICY: one_model_config(spec, dims, gpu_count)}
    else:
        dicts = {
            name: runner_config(name, spec.runners[name], dims, admission_params(name, spec), gpu_count=gpu_count)
            for name in RUNNER_MODELS
        }
        dicts[io.POLICY] = policy_config(spec, dims)
    return {name: json_format.ParseDict(d, model_config_pb2.ModelConfig()) for name, d in dicts.items()}


def render(config: model_config_pb2.ModelConfig) -> str:
    return text_format.MessageToString(config)


def _link_artifacts(source: Path, target: Path) -> None:
    """Link every artifact of ``source`` from ``target``; a link there already is replaced (it may point at
    another export), a real file is left alone."""
    target.mkdir(parents=True, exist_ok=True)
    for artifact in source.iterdir():
        link = target / artifact.name
        if artifact.name in ("model.py", "__pycache__") or (link.exists() and not link.is_symlink()):
            continue
        if link.is_symlink():
            link.unlink()
        link.symlink_to(artifact.resolve())


def write_repository(
    spec: Spec,
    out: Path,
    settings: ModelSettings | None = None,
    artifacts_from: Path | None = None,
    gpu_count: int | None = None,
):
    """Write configs (and the runner entry points) into ``out``; link artifacts from another repository. The
    instance groups' GPUs are resolved for a host with ``gpu_count`` GPUs (default: this host's).

    A one_model policy is written only into another folder: its version folder links each step's artifacts
    into a subfolder of the step's name (``policy/1/encoder/``), and the steps' own models are left out (a
    server loads every model of its repository)."""
    if spec.one_model:
        if artifacts_from is None or Path(out).resolve() == Path(artifacts_from).resolve():
            raise VlaserveError(
                f"models.{io.POLICY}.pipeline",
                "one_model",
                "a repository written into another folder (--out): the exported one keeps the steps' models",
            )
        for name in RUNNER_MODELS:
            if (Path(out) / name / CONFIG_FILE).exists():
                raise VlaserveError(
                    "--out", str(out), f"a folder without the {name} model (a one_model policy runs the steps itself)"
                )
    for name, config in build_configs(spec, settings, gpu_count).items():
        version_dir = out / name / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        (out / name / CONFIG_FILE).write_text(render(config))
        if name in RUNNER_MODELS or spec.one_model:
            (version_dir / "model.py").write_text(MODEL_PY)
        if name in RUNNER_MODELS and artifacts_from is not None:
            _link_artifacts(artifacts_from / name / "1", version_dir)
        if name == io.POLICY and spec.one_model:
            for step in RUNNER_MODELS:
                _link_artifacts(artifacts_from / step / "1", version_dir / step)
    return out


def runner_configs(repo: Path) -> dict[str, model_config_pb2.ModelConfig]:
    """The configs of a repository's Python-backend models: the steps of an ensemble, or the policy run as
    one model."""
    repo = Path(repo)
    found = {
        name: read_config(repo / name / CONFIG_FILE) for name in RUNNER_MODELS if (repo / name / CONFIG_FILE).exists()
    }
    policy = repo / io.POLICY / CONFIG_FILE
    if not found and policy.exists():
        config = read_config(policy)
        if config.backend == "python":
            found[io.POLICY] = config
    return found


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    """Parse a config.pbtxt into a ModelConfig (raises on anything that is not one)."""
    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


def drain_seconds(repo: Path) -> int:
    """How long a request admitted just before a stop can still take: the queue timeouts it can wait out
    (the encoder's, its wait for an in-flight slot, the decoder's), plus 10 s for the compute."""
    total = 10.0
    for config in runner_configs(repo).values():
        if config.HasField("dynamic_batching"):
            total += config.dynamic_batching.default_queue_policy.default_timeout_microseconds / 1e6
        total += RunnerParams.of_model_config(config).admission_wait_s or 0.0
    return math.ceil(total)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vlaserve.repository",
        description="Generate every config.pbtxt of a model repository from its spec.yaml.",
    )
    parser.add_argument(
        "--repository", default="model_repository", help="the source repository (default: model_repository)"
    )
    parser.add_argument("--spec", help="spec file (default: <repository>/spec.yaml)")
    parser.add_argument("--variant", help="apply this variant of the spec (see its 'variants:' section)")
    parser.add_argument("--out", help="write the (variant) repository here, artifacts linked from --repository")
    parser.add_argument("--list-variants", action="store_true", help="print the spec's variants and exit")
    parser.add_argument(
        "--gpus",
        type=int,
        help="GPUs of the host that serves, for instance groups with gpus: all/even/odd (default: this host's, "
        "from $CUDA_VISIBLE_DEVICES or nvidia-smi; 1 where there are none)",
    )
    args = parser.parse_args(argv)
    repo = Path(args.repository)
    spec_path = Path(args.spec) if args.spec else repo / SPEC_FILE
    try:
        if args.list_variants:
            print("\n".join(variant_names(spec_path)))
            return 0
        if args.gpus is not None and not 1 <= args.gpus <= 64:
            raise VlaserveError("--gpus", args.gpus, "an integer in 1..64")
        spec = load_spec(spec_path, args.variant)
        settings = read_manifest_settings(repo) or spec.model
        out = Path(args.out) if args.out else repo
        write_repository(
            spec, out, settings, artifacts_from=repo if out.resolve() != repo.resolve() else None, gpu_count=args.gpus
        )
    except VlaserveError as exc:
        print(f"repository: error: {exc}", file=sys.stderr)
        return 2
    gpus = f"{args.gpus} GPU(s), --gpus" if args.gpus else "{} GPU(s), {}".format(*host_gpus())
    variant = f", variant {args.variant}" if args.variant else ""
    print(
        f"wrote {out} ({settings.preset}, {settings.views} views, {settings.prompt_tokens} prompt tokens, {settings.dtype}{variant}; for {gpus})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
