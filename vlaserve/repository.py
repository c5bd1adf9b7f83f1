"""The model repository, generated from one declarative spec (``model_repository/spec.yaml``).

Every ``config.pbtxt`` is built as a ``tritonclient.grpc.model_config_pb2.ModelConfig`` (through
``json_format.ParseDict``) and written with protobuf's ``text_format``; nothing is templated.

``python -m vlaserve.repository`` regenerates the configs of a repository, or writes a variant of it
(for example ``--variant naive``) into another folder whose artifacts link back to the source.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
from pathlib import Path

import yaml
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from vlaserve import interface as io
from vlaserve.admission import MAX_SLOTS
from vlaserve.errors import VlaserveError
from vlaserve.model.presets import get_preset
from vlaserve.params import GroupLimits, RunnerParams
from vlaserve.runtimes import RUNTIMES
from vlaserve.value_check import VALUE_CHECK_MODES

SPEC_FILE = "spec.yaml"
CONFIG_FILE = "config.pbtxt"
MODEL_PY = '"""Triton Python-backend entry point: the shared runner serves this model (see vlaserve.runner)."""\n\nfrom vlaserve.runner import TritonPythonModel  # noqa: F401\n'
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
TYPE_OF_DTYPE = {"fp32": "TYPE_FP32", "fp16": "TYPE_FP16", "bf16": "TYPE_BF16"}
RUNNER_MODELS = tuple(step.model for step in io.PIPELINE)

MODEL_KEYS = {
    "runtime",
    "max_batch_size",
    "cpu_threads",
    "dynamic_batching",
    "instance_groups",
    "warmup_batch_sizes",
    "warmup_count",
    "noise_seed",
    "batch_buckets",
    "cuda_graphs",
    "compile",
    "value_check",
}
BATCHING_KEYS = {
    "preferred_batch_size",
    "max_queue_delay_microseconds",
    "priority_levels",
    "default_priority_level",
    "max_queue_size",
    "queue_timeout_microseconds",
}
GROUP_KEYS = {"name", "count", "kind", "gpus", "mps_thread_percentage", "mps_pinned_memory_limit_mb"}


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """What the artifacts were exported as: it fixes the tensor shapes and dtypes of the configs."""

    preset: str
    views: int
    dtype: str


def _deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _check_keys(section: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise VlaserveError(f"{where}.{unknown[0]}", section[unknown[0]], f"one of the keys {sorted(allowed)}")


def _positive_int(value, where: str, maximum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (maximum and value > maximum):
        raise VlaserveError(where, value, f"an integer in 1..{maximum}" if maximum else "a positive integer")
    return value


def validate_spec(spec: dict) -> dict:
    """Check the spec (after any variant is applied); every problem names its key path."""
    _check_keys({k: v for k, v in spec.items() if not k.startswith("x-")}, {"model", "models", "variants"}, "spec")
    model = spec.get("model", {})
    _check_keys(model, {"preset", "views", "dtype"}, "model")
    if model.get("dtype", "fp32") not in TYPE_OF_DTYPE:
        raise VlaserveError("model.dtype", model.get("dtype"), f"one of {list(TYPE_OF_DTYPE)}")
    models = spec.get("models", {})
    _check_keys(models, {*RUNNER_MODELS, io.POLICY}, "models")
    for name in RUNNER_MODELS:
        m = models.get(name)
        if not isinstance(m, dict):
            raise VlaserveError(f"models.{name}", m, "a mapping of model settings")
        _check_keys(m, MODEL_KEYS, f"models.{name}")
        if m.get("runtime") not in RUNTIMES:
            raise VlaserveError(f"models.{name}.runtime", m.get("runtime"), f"one of {list(RUNTIMES)}")
        mbs = _positive_int(m.get("max_batch_size"), f"models.{name}.max_batch_size")
        batching = m.get("dynamic_batching")
        if batching:
            _check_keys(batching, BATCHING_KEYS, f"models.{name}.dynamic_batching")
            for size in batching.get("preferred_batch_size", []):
                _positive_int(size, f"models.{name}.dynamic_batching.preferred_batch_size", mbs)
            levels = batching.get("priority_levels", 0)
            if levels:
                _positive_int(
                    batching.get("default_priority_level"),
                    f"models.{name}.dynamic_batching.default_priority_level",
                    levels,
                )
        groups = m.get("instance_groups")
        if not groups:
            raise VlaserveError(f"models.{name}.instance_groups", groups, "a list of at least one instance group")
        names = set()
        for i, g in enumerate(groups):
            where = f"models.{name}.instance_groups[{i}]"
            _check_keys(g, GROUP_KEYS, where)
            if not g.get("name") or g["name"] in names:
                raise VlaserveError(f"{where}.name", g.get("name"), "a name unique within the model")
            names.add(g["name"])
            _positive_int(g.get("count"), f"{where}.count")
            if g.get("kind", "cpu") not in KINDS:
                raise VlaserveError(f"{where}.kind", g.get("kind"), f"one of {list(KINDS)}")
            if "mps_thread_percentage" in g:
                _positive_int(g["mps_thread_percentage"], f"{where}.mps_thread_percentage", 100)
            if "mps_pinned_memory_limit_mb" in g:
                _positive_int(g["mps_pinned_memory_limit_mb"], f"{where}.mps_pinned_memory_limit_mb")
        for key in ("warmup_batch_sizes", "batch_buckets"):
            for size in m.get(key, []):
                _positive_int(size, f"models.{name}.{key}", mbs)
        if m.get("cuda_graphs") not in (None, True, False):
            raise VlaserveError(f"models.{name}.cuda_graphs", m["cuda_graphs"], "true or false")
        if m.get("cuda_graphs") and (m["runtime"] != "torchscript" or not m.get("batch_buckets")):
            raise VlaserveError(
                f"models.{name}.cuda_graphs", True, "runtime torchscript and batch_buckets (one graph per bucket)"
            )
        if m.get("compile") not in (None, True, False):
            raise VlaserveError(f"models.{name}.compile", m["compile"], "true or false")
        if m.get("compile") and m["runtime"] != "torchscript":
            raise VlaserveError(f"models.{name}.compile", True, "runtime torchscript (it compiles the traced model)")
        if m.get("value_check", "refuse") not in VALUE_CHECK_MODES:
            raise VlaserveError(f"models.{name}.value_check", m["value_check"], f"one of {list(VALUE_CHECK_MODES)}")
        if "warmup_count" in m:
            _positive_int(m["warmup_count"], f"models.{name}.warmup_count")
        for key in ("cpu_threads", "noise_seed"):  # 0 is allowed: the runtime's own thread count, seed 0
            value = m.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise VlaserveError(f"models.{name}.{key}", value, "a non-negative integer")
    policy = models.get(io.POLICY, {})
    _check_keys(policy, {"max_batch_size", "max_in_flight"}, f"models.{io.POLICY}")
    limit = min(models[n]["max_batch_size"] for n in RUNNER_MODELS)
    _positive_int(policy.get("max_batch_size"), f"models.{io.POLICY}.max_batch_size", limit)
    if policy.get("max_in_flight") is not None:
        where = f"models.{io.POLICY}.max_in_flight"
        in_flight = _positive_int(policy["max_in_flight"], where, MAX_SLOTS)
        first, last = RUNNER_MODELS[0], RUNNER_MODELS[-1]
        if in_flight < models[first]["max_batch_size"]:  # the first model admits a whole batch at once
            raise VlaserveError(where, in_flight, f"at least the {first}'s max_batch_size")
        last_queue = (models[last].get("dynamic_batching") or {}).get("max_queue_size")
        if last_queue is not None and last_queue < in_flight:  # else the last model rejects admitted work
            raise VlaserveError(
                f"models.{last}.dynamic_batching.max_queue_size",
                last_queue,
                f"at least models.{io.POLICY}.max_in_flight ({in_flight}): the {last} must hold all admitted requests",
            )
    return spec


def load_spec(path: Path, variant: str | None = None) -> dict:
    """Read and check the spec; with ``variant``, apply that variant's overrides first."""
    if not Path(path).is_file():
        raise VlaserveError("spec", str(path), "an existing spec.yaml")
    spec = yaml.safe_load(Path(path).read_text()) or {}
    if variant:
        variants = spec.get("variants", {})
        if variant not in variants:
            raise VlaserveError("variant", variant, f"one of {sorted(variants)}")
        spec = _deep_merge(spec, variants[variant])
    return validate_spec(spec)


def variant_names(path: Path) -> list[str]:
    """The variants a spec defines, in file order."""
    return list((yaml.safe_load(Path(path).read_text()) or {}).get("variants", {}))


def check_runtimes(spec: dict, formats) -> None:
    """Every runner model's runtime must have an artifact among ``formats``."""
    for name in RUNNER_MODELS:
        runtime = spec["models"][name]["runtime"]
        if RUNTIMES[runtime].format not in formats:
            raise VlaserveError(
                f"models.{name}.runtime", runtime, f"a runtime for the exported formats {list(formats)}"
            )


def settings_of(spec: dict) -> ModelSettings:
    model = spec.get("model", {})
    return ModelSettings(model.get("preset", "tiny"), int(model.get("views", 2)), model.get("dtype", "fp32"))


def tensor_dims(settings: ModelSettings) -> dict[str, tuple[list[int], str]]:
    """Per-item dims and Triton type of every tensor, for the exported preset, views and dtype."""
    cfg = get_preset(settings.preset, settings.views)
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


def admission_params(name: str, models: dict) -> dict:
    """The RunnerParams fields of the pipeline's in-flight limit (vlaserve.admission), or none: the first
    model of the pipeline takes a slot per request before it computes, the last gives it back."""
    limit = models[io.POLICY].get("max_in_flight")
    first, last = RUNNER_MODELS[0], RUNNER_MODELS[-1]
    if not limit or name not in (first, last):
        return {}

    def timeout_s(model: str, default: float) -> float:
        batching = models[model].get("dynamic_batching") or {}
        return batching.get("queue_timeout_microseconds", default * 1e6) / 1e6

    params = {"admission_role": "acquire" if name == first else "release", "admission_limit": limit}
    # a slot nobody gives back is lent again after the last model's queue timeout and 10 s more
    params["admission_ttl_s"] = timeout_s(last, 20.0) + 10.0
    if name == first:  # how long a batch waits for room before it is answered UNAVAILABLE
        params["admission_wait_s"] = timeout_s(first, 5.0)
    return params


def runner_params(m: dict, admission: dict | None = None) -> RunnerParams:
    """The runner parameters of one model of the spec."""
    return RunnerParams(
        runtime=m["runtime"],
        cpu_threads=m.get("cpu_threads"),
        noise_seed=m.get("noise_seed"),
        value_check=m.get("value_check"),
        batch_buckets=tuple(m.get("batch_buckets") or ()),
        compile=bool(m.get("compile")),
        cuda_graphs=bool(m.get("cuda_graphs")),
        groups={
            g["name"]: GroupLimits(g.get("mps_thread_percentage"), g.get("mps_pinned_memory_limit_mb"))
            for g in m["instance_groups"]
            if "mps_thread_percentage" in g or "mps_pinned_memory_limit_mb" in g
        },
        **(admission or {}),
    )


def runner_config(name: str, m: dict, dims, admission: dict | None = None) -> dict:
    """The ModelConfig (as a dict) of the encoder or the decoder."""
    inputs, outputs = MODEL_IO[name]
    params = runner_params(m, admission).to_config()
    groups = []
    for g in m["instance_groups"]:
        group = {"name": g["name"], "count": g["count"], "kind": KINDS[g.get("kind", "cpu")]}
        if g.get("gpus") is not None and g.get("kind") == "gpu":
            group["gpus"] = g["gpus"]
        groups.append(group)
    config = {
        "name": name,
        "backend": "python",
        "max_batch_size": m["max_batch_size"],
        "input": _io_entries(inputs, dims, optional=True),
        "output": _io_entries(outputs, dims, optional=False),
        "instance_group": groups,
        "parameters": _string_params(params),
    }
    batching = m.get("dynamic_batching")
    if batching:
        db = {
            "preferred_batch_size": batching.get("preferred_batch_size", []),
            "max_queue_delay_microseconds": batching.get("max_queue_delay_microseconds", 0),
        }
        policy = {"timeout_action": "REJECT", "allow_timeout_override": True}
        if "max_queue_size" in batching:
            policy["max_queue_size"] = batching["max_queue_size"]
        if "queue_timeout_microseconds" in batching:
            policy["default_timeout_microseconds"] = batching["queue_timeout_microseconds"]
        db["default_queue_policy"] = policy
        if batching.get("priority_levels"):
            db["priority_levels"] = batching["priority_levels"]
            db["default_priority_level"] = batching["default_priority_level"]
        config["dynamic_batching"] = db
    warmups = []
    for size in m.get("warmup_batch_sizes", []):
        warm_inputs = {}
        for input_name in inputs:
            kind = WARMUP_DATA.get(input_name, "zero_data")
            if kind:
                shape, dtype = dims[input_name]
                warm_inputs[input_name] = {"data_type": dtype, "dims": shape, kind: True}
        warmups.append(
            {"name": f"batch_{size}", "batch_size": size, "inputs": warm_inputs, "count": m.get("warmup_count", 1)}
        )
    if warmups:
        config["model_warmup"] = warmups
    return config


def policy_config(spec: dict, dims) -> dict:
    """The ensemble: the pipeline's steps in order, answering with the last step's outputs."""
    inputs, outputs = MODEL_IO[io.POLICY]
    return {
        "name": io.POLICY,
        "platform": "ensemble",
        "max_batch_size": spec["models"][io.POLICY]["max_batch_size"],
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


def build_configs(spec: dict, settings: ModelSettings | None = None) -> dict[str, model_config_pb2.ModelConfig]:
    """Every model's ModelConfig message."""
    dims = tensor_dims(settings or settings_of(spec))
    dicts = {
        name: runner_config(name, spec["models"][name], dims, admission_params(name, spec["models"]))
        for name in RUNNER_MODELS
    }
    dicts[io.POLICY] = policy_config(spec, dims)
    return {name: json_format.ParseDict(d, model_config_pb2.ModelConfig()) for name, d in dicts.items()}


def render(config: model_config_pb2.ModelConfig) -> str:
    return text_format.MessageToString(config)


def uses_mps(spec: dict) -> bool:
    """Whether any instance group of ``spec`` sets an MPS percentage (its server then needs the MPS daemon)."""
    groups = [g for name in RUNNER_MODELS for g in spec["models"][name]["instance_groups"]]
    return any("mps_thread_percentage" in g for g in groups)


def write_repository(spec: dict, out: Path, settings: ModelSettings | None = None, artifacts_from: Path | None = None):
    """Write configs (and the runner entry points) into ``out``; link artifacts from another repository."""
    for name, config in build_configs(spec, settings).items():
        version_dir = out / name / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        (out / name / CONFIG_FILE).write_text(render(config))
        if name in RUNNER_MODELS:
            (version_dir / "model.py").write_text(MODEL_PY)
            if artifacts_from is not None:
                for artifact in (artifacts_from / name / "1").iterdir():
                    if artifact.name != "model.py" and not (version_dir / artifact.name).exists():
                        (version_dir / artifact.name).symlink_to(artifact.resolve())
    return out


def read_config(path: Path) -> model_config_pb2.ModelConfig:
    """Parse a config.pbtxt into a ModelConfig (raises on anything that is not one)."""
    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


def manifest_path(repo: Path, model: str) -> Path:
    """Where ``make export`` writes ``model``'s manifest in ``repo``."""
    return Path(repo) / model / "1" / io.MANIFEST_FILE


def drain_seconds(repo: Path) -> int:
    """How long a request admitted just before SIGTERM can still take: the queue timeouts it can wait
    out (the encoder's, its wait for an in-flight slot, the decoder's), plus 10 s for the compute."""
    total = 10.0
    for name in RUNNER_MODELS:
        config = read_config(Path(repo) / name / "config.pbtxt")
        if config.HasField("dynamic_batching"):
            total += config.dynamic_batching.default_queue_policy.default_timeout_microseconds / 1e6
        total += RunnerParams.of_model_config(config).admission_wait_s or 0.0
    return math.ceil(total)


def read_manifest(repo: Path, model: str) -> dict:
    """``model``'s manifest in ``repo`` (what was exported: preset, dtype, tensor specs, golden sample)."""
    import json

    return json.loads(manifest_path(repo, model).read_text())


def read_manifest_settings(repo: Path) -> ModelSettings | None:
    """The settings the encoder's artifacts were exported with, or None when nothing was exported."""
    if not manifest_path(repo, RUNNER_MODELS[0]).is_file():
        return None
    m = read_manifest(repo, RUNNER_MODELS[0])
    return ModelSettings(m["preset"], m["views"], m["dtype"])


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
    args = parser.parse_args(argv)
    repo = Path(args.repository)
    spec_path = Path(args.spec) if args.spec else repo / SPEC_FILE
    try:
        if args.list_variants:
            print("\n".join(variant_names(spec_path)))
            return 0
        spec = load_spec(spec_path, args.variant)
        settings = read_manifest_settings(repo) or settings_of(spec)
        out = Path(args.out) if args.out else repo
        write_repository(spec, out, settings, artifacts_from=repo if out.resolve() != repo.resolve() else None)
    except VlaserveError as exc:
        print(f"repository: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {out} ({settings.preset}, {settings.views} views, {settings.dtype}{', variant ' + args.variant if args.variant else ''})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
