"""The repository spec (``model_repository/spec.yaml``) as typed, frozen dataclasses, checked once.

:func:`parse_spec` turns the YAML's mapping into a :class:`Spec`; every problem is a VlaserveError naming
its YAML path (``models.encoder.instance_groups[0].kind``). Each field's type and bounds are declared on
the dataclass; the few rules between fields sit in each class's ``check``. Everything after the parse
(config generation, the launcher, the benchmarks) reads typed fields and never checks again.

A variant (the spec's ``variants:`` section) is merged into the mapping before the parse, so a variant is
checked exactly as the base is. To change a spec in code, edit the mapping (:func:`load_raw`) and parse it,
or use :meth:`Spec.with_model`; both check the result.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path

import yaml

from vlaserve import interface as io
from vlaserve.admission import MAX_SLOTS
from vlaserve.errors import VlaserveError
from vlaserve.manifest import ModelSettings
from vlaserve.runtimes import RUNTIMES
from vlaserve.value_check import VALUE_CHECK_MODES

KINDS = ("cpu", "gpu")
# Named sets of a host's GPUs for an instance group's gpus, by GPU count: every GPU (data parallel), or the
# even and the odd ones (two kinds of instances on alternate GPUs, e.g. encoder and decoder on two of them).
GPU_SETS = {
    "all": lambda n: range(n),
    "even": lambda n: range(0, n, 2),
    "odd": lambda n: range(1, n, 2),
}
PRECISIONS = ("bf16", "fp8")
RUNNER_MODELS = tuple(step.model for step in io.PIPELINE)
# How the policy runs its steps: "ensemble", each step a model of its own (its own batching and instances;
# a step's outputs reach the next through the host), or "one_model", the policy one model whose instances
# run every step in their own process (the outputs stay where they were computed: on the GPU, no copy).
PIPELINES = ("ensemble", "one_model")
# What the steps of a one_model policy must share: the policy's instances run them all, on one device.
ONE_MODEL_SHARED = ("runtime", "instance_groups", "batch_buckets", "value_check")


def _field(default=dataclasses.MISSING, *, minimum: int | None = None, maximum: int | None = None, choices=None):
    """A dataclass field with the bounds the parser checks (``choices`` may be a callable, read at parse time)."""
    meta = {"minimum": minimum, "maximum": maximum, "choices": choices}
    if isinstance(default, tuple | list):
        return dataclasses.field(default=tuple(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Batching:
    """Triton's dynamic batcher for one model; ``None`` fields are left to Triton's defaults."""

    preferred_batch_size: tuple[int, ...] = _field((), minimum=1)
    max_queue_delay_microseconds: int = _field(0, minimum=0)
    priority_levels: int = _field(0, minimum=0)  # 0: no priorities
    default_priority_level: int | None = _field(None, minimum=1)
    max_queue_size: int | None = _field(None, minimum=0)  # beyond it, requests are rejected at once (0: no limit)
    queue_timeout_microseconds: int | None = _field(None, minimum=0)  # 0: no timeout

    def check_sizes(self, where: str, max_batch_size: int) -> None:
        for size in self.preferred_batch_size:
            if size > max_batch_size:
                raise VlaserveError(f"{where}.preferred_batch_size", size, f"an integer in 1..{max_batch_size}")
        if self.priority_levels and not 1 <= (self.default_priority_level or 0) <= self.priority_levels:
            raise VlaserveError(
                f"{where}.default_priority_level",
                self.default_priority_level,
                f"an integer in 1..{self.priority_levels}",
            )


@dataclasses.dataclass(frozen=True)
class InstanceGroup:
    """One instance group; the MPS limits are put into each instance's environment before CUDA starts."""

    name: str
    count: int = _field(minimum=1)
    kind: str = _field("cpu", choices=KINDS)
    # kind gpu: GPU ids, or a set of the host's GPUs (GPU_SETS), resolved for the host's GPU count when the
    # configs are written; unset: Triton's default, instances on every GPU. The MPS limits hold on each GPU.
    gpus: tuple[int, ...] | str | None = _field(None, minimum=0, choices=lambda: GPU_SETS)
    mps_thread_percentage: int | None = _field(None, minimum=1, maximum=100)
    mps_pinned_memory_limit_mb: int | None = _field(None, minimum=1)

    def device_ids(self, gpu_count: int, where: str) -> tuple[int, ...] | None:
        """The GPU ids of this group on a host with ``gpu_count`` GPUs (None: unset, Triton's every GPU)."""
        if self.gpus is None or self.kind != "gpu":
            return None
        ids = tuple(GPU_SETS[self.gpus](gpu_count)) if isinstance(self.gpus, str) else self.gpus
        if not ids:
            raise VlaserveError(
                f"{where}.gpus",
                self.gpus,
                f"a set naming at least one GPU of a host with {gpu_count} GPU(s) (python -m vlaserve.repository "
                "--gpus N: the GPUs of the host that serves)",
            )
        if max(ids) >= gpu_count:
            raise VlaserveError(
                f"{where}.gpus",
                list(ids),
                f"GPU ids below {gpu_count}: the configs are written for a host with {gpu_count} GPU(s) "
                "(python -m vlaserve.repository --gpus N: the GPUs of the host that serves)",
            )
        return ids


@dataclasses.dataclass(frozen=True)
class RunnerModel:
    """One runner model of the pipeline (the encoder or the decoder)."""

    runtime: str = _field(choices=lambda: list(RUNTIMES))
    max_batch_size: int = _field(minimum=1)
    instance_groups: tuple[InstanceGroup, ...] = ()
    dynamic_batching: Batching | None = None
    cpu_threads: int | None = _field(None, minimum=0)  # intra-op threads per instance, 0: the runtime's own
    noise_seed: int | None = _field(None, minimum=0)  # seeds the noise drawn for a request without one
    warmup_batch_sizes: tuple[int, ...] = _field((), minimum=1)
    warmup_count: int = _field(1, minimum=1)
    batch_buckets: tuple[int, ...] = _field((), minimum=1)  # batches are padded up to these sizes
    cuda_graphs: bool | None = False  # null reads as false, as in a variant that turns it off
    compile: bool | None = False
    # the decoder's expert layers as fused Triton kernels (vlaserve.model.kernels): one more CUDA-graph
    # choice per bucket, checked against the artifact like the others and kept where it replays fastest
    fused_kernels: bool | None = False
    value_check: str | None = _field(None, choices=VALUE_CHECK_MODES)  # None: the runner's default (refuse)
    # fp8: the encoder's chosen products in float8 e4m3 (vlaserve.model.fp8), on the compiled model; None or
    # bf16: as exported
    precision: str | None = _field(None, choices=PRECISIONS)

    def check(self, where: str) -> None:
        if not self.instance_groups:
            raise VlaserveError(f"{where}.instance_groups", [], "a list of at least one instance group")
        names = [g.name for g in self.instance_groups]
        for i, name in enumerate(names):
            if not name or name in names[:i]:
                raise VlaserveError(f"{where}.instance_groups[{i}].name", name, "a name unique within the model")
        if self.dynamic_batching:
            self.dynamic_batching.check_sizes(f"{where}.dynamic_batching", self.max_batch_size)
        for key in ("warmup_batch_sizes", "batch_buckets"):
            for size in getattr(self, key):
                if size > self.max_batch_size:
                    raise VlaserveError(f"{where}.{key}", size, f"an integer in 1..{self.max_batch_size}")
        if self.cuda_graphs and (self.runtime != "torchscript" or not self.batch_buckets):
            raise VlaserveError(
                f"{where}.cuda_graphs", True, "runtime torchscript and batch_buckets (one graph per bucket)"
            )
        if self.compile and self.runtime != "torchscript":
            raise VlaserveError(f"{where}.compile", True, "runtime torchscript (it compiles the traced model)")
        if self.precision == "fp8" and not self.compile:
            raise VlaserveError(f"{where}.precision", "fp8", "compile: true (fp8 products are a compiled model's)")
        if self.fused_kernels and not (self.compile and self.cuda_graphs):
            raise VlaserveError(
                f"{where}.fused_kernels", True, "compile and cuda_graphs (a graph choice of the compiled model)"
            )

    @property
    def uses_mps(self) -> bool:
        return any(g.mps_thread_percentage is not None for g in self.instance_groups)


@dataclasses.dataclass(frozen=True)
class PolicySettings:
    """The policy: how it runs the steps, its batch limit and, as an ensemble, the pipeline's in-flight limit
    (vlaserve.admission). As one model it is batched and placed as its first step says (that step's
    dynamic_batching, instance_groups and warm-up), and each step keeps its own runtime settings."""

    max_batch_size: int = _field(minimum=1)
    max_in_flight: int | None = _field(None, minimum=1, maximum=MAX_SLOTS)
    pipeline: str = _field("ensemble", choices=PIPELINES)


@dataclasses.dataclass(frozen=True)
class RobotSettings:
    """How one robot's observations become a policy request and the actions go back (``vlaserve.gateway``,
    ``vlaserve.robots``). Observation keys may name nested entries with "/" ("images/cam_high"); a key that
    is itself written with "/" (DROID's "observation/joint_position") is found as it is first."""

    images: tuple[str, ...]  # the camera frames' keys, in the model's view order
    state_dim: int = _field(minimum=1, maximum=io.STATE_DIM)  # the robot's state size (padded to the model's)
    action_dim: int = _field(minimum=1, maximum=io.ACTION_DIM)  # the action dimensions returned
    state: tuple[str, ...] = ()  # keys concatenated, in order, into the state
    image_layout: str = _field("hwc", choices=("hwc", "chw"))  # uint8 [H, W, 3] or [3, H, W], any size
    prompt_key: str = "prompt"
    default_prompt: str = ""  # for an observation without a prompt
    norm_stats: str | None = None  # JSON {"state": {"mean", "std"}, "actions": {"mean", "std"}}; relative: to the spec
    tokenizer: str | None = None  # a SentencePiece model file (relative: to the spec); none: the stand-in hasher

    def check(self, where: str) -> None:
        if not 1 <= len(self.images) <= io.MAX_VIEWS:
            raise VlaserveError(f"{where}.images", list(self.images), f"1..{io.MAX_VIEWS} camera keys")
        if not self.state:
            raise VlaserveError(f"{where}.state", [], "the observation keys of the robot's state")


@dataclasses.dataclass(frozen=True)
class Spec:
    """The whole spec: what was exported, each runner model in pipeline order, and the ensemble."""

    model: ModelSettings
    runners: Mapping[str, RunnerModel]  # read-only (a MappingProxyType): edits go through with_model
    policy: PolicySettings
    variants: Mapping[str, dict] = dataclasses.field(default_factory=dict)  # as written: merged before a parse
    robots: Mapping[str, RobotSettings] = dataclasses.field(default_factory=dict)  # the gateway's robot configs

    def __post_init__(self):
        object.__setattr__(self, "runners", types.MappingProxyType(dict(self.runners)))
        object.__setattr__(self, "variants", types.MappingProxyType(dict(self.variants)))
        object.__setattr__(self, "robots", types.MappingProxyType(dict(self.robots)))

    def check(self) -> None:
        for name, model in self.runners.items():
            if model.fused_kernels and name != io.DECODER:
                raise VlaserveError(
                    f"models.{name}.fused_kernels", True, f"false: only the {io.DECODER} has fused kernels"
                )
            if model.precision == "fp8" and name != io.ENCODER:
                raise VlaserveError(
                    f"models.{name}.precision", "fp8", f"bf16 or none: only the {io.ENCODER} has fp8 products"
                )
        where = f"models.{io.POLICY}"
        limit = min(m.max_batch_size for m in self.runners.values())
        if self.policy.max_batch_size > limit:
            raise VlaserveError(f"{where}.max_batch_size", self.policy.max_batch_size, f"an integer in 1..{limit}")
        in_flight = self.policy.max_in_flight
        if self.one_model:
            first = self.runners[RUNNER_MODELS[0]]
            for name in RUNNER_MODELS[1:]:
                for key in ONE_MODEL_SHARED:
                    if getattr(self.runners[name], key) != getattr(first, key):
                        raise VlaserveError(
                            f"models.{name}.{key}",
                            _plain(getattr(self.runners[name], key)),
                            f"the {RUNNER_MODELS[0]}'s ({_plain(getattr(first, key))}): with {where}.pipeline "
                            "one_model, one process runs every step",
                        )
            if in_flight is not None:
                raise VlaserveError(
                    f"{where}.max_in_flight", in_flight, "none with pipeline one_model (nothing waits between steps)"
                )
            if first.dynamic_batching:  # the policy is batched as the first step says
                first.dynamic_batching.check_sizes(
                    f"models.{RUNNER_MODELS[0]}.dynamic_batching", self.policy.max_batch_size
                )
            for key in ("warmup_batch_sizes", "batch_buckets"):  # the policy's batches are the ones it runs
                for size in getattr(first, key):
                    if size > self.policy.max_batch_size:
                        raise VlaserveError(
                            f"models.{RUNNER_MODELS[0]}.{key}",
                            size,
                            f"an integer in 1..{self.policy.max_batch_size} ({where}.max_batch_size, with pipeline "
                            "one_model)",
                        )
        if in_flight is None:
            return
        first, last = RUNNER_MODELS[0], RUNNER_MODELS[-1]
        if in_flight < self.runners[first].max_batch_size:  # the first model admits a whole batch at once
            raise VlaserveError(f"{where}.max_in_flight", in_flight, f"at least the {first}'s max_batch_size")
        last_queue = (self.runners[last].dynamic_batching or Batching()).max_queue_size
        if last_queue is not None and last_queue < in_flight:  # else the last model rejects admitted work
            raise VlaserveError(
                f"models.{last}.dynamic_batching.max_queue_size",
                last_queue,
                f"at least {where}.max_in_flight ({in_flight}): the {last} must hold all admitted requests",
            )

    @property
    def one_model(self) -> bool:
        """Whether the policy is one model running every step (else an ensemble of the steps' models)."""
        return self.policy.pipeline == "one_model"

    @property
    def uses_mps(self) -> bool:
        """Whether any instance group sets an MPS percentage (its server then needs the MPS daemon)."""
        return any(m.uses_mps for m in self.runners.values())

    def with_model(self, name: str, **changes) -> Spec:
        """This spec with settings of one model (a runner or the policy) replaced, given as spec.yaml writes
        them (``instance_groups=[{"name": ..., "count": 1}]``) and checked as the file's would be."""
        where = f"models.{name}"
        if name not in (*self.runners, io.POLICY):
            raise VlaserveError("model", name, f"one of {[*self.runners, io.POLICY]}")
        if name == io.POLICY:
            policy = parse_section(PolicySettings, {**dataclasses.asdict(self.policy), **changes}, where)
            spec = dataclasses.replace(self, policy=policy)
        else:
            model = parse_section(RunnerModel, {**dataclasses.asdict(self.runners[name]), **changes}, where)
            spec = dataclasses.replace(self, runners={**self.runners, name: model})
        spec.check()
        return spec


# ---- the parser: one generic walk over the dataclasses' annotations ----------------------------------
def _value(kind, value, where: str, meta: Mapping):
    """``value`` checked against the annotation ``kind`` (and ``meta``'s bounds), converted to it."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if value is None or (value == {} and dataclasses.is_dataclass(options[0])):  # an empty section: none
            return None
        if isinstance(value, str) and str in options:  # a name where a list may stand (gpus: all)
            return _value(str, value, where, meta)
        return _value(options[0], value, where, meta)
    if dataclasses.is_dataclass(kind):
        return parse_section(kind, value, where)
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if not isinstance(value, list | tuple):
            raise VlaserveError(where, value, "a list")
        return tuple(_value(item, v, f"{where}[{i}]" if dataclasses.is_dataclass(item) else where, meta)
                     for i, v in enumerate(value))  # fmt: skip
    if kind is bool:
        if not isinstance(value, bool):
            raise VlaserveError(where, value, "true or false")
        return value
    if kind is int:
        low, high = meta.get("minimum"), meta.get("maximum")
        fits = isinstance(value, int) and not isinstance(value, bool)
        if not fits or (low is not None and value < low) or (high is not None and value > high):
            if low == 1 and high is None:
                raise VlaserveError(where, value, "a positive integer")
            if low == 0 and high is None:
                raise VlaserveError(where, value, "a non-negative integer")
            raise VlaserveError(where, value, f"an integer in {low}..{high}" if high is not None else "an integer")
        return value
    if kind is str:
        choices = meta.get("choices")
        choices = choices() if callable(choices) else choices
        if not isinstance(value, str) or (choices is not None and value not in choices):
            raise VlaserveError(where, value, f"one of {list(choices)}" if choices is not None else "a string")
        return value
    raise TypeError(f"spec: no parser for a field of type {kind!r} ({where})")


def parse_section(cls, data, where: str):
    """One dataclass of the spec from its mapping: unknown and missing keys are named with their path."""
    if not isinstance(data, Mapping):
        raise VlaserveError(where, data, f"a mapping of {cls.__name__} settings")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise VlaserveError(f"{where}.{unknown[0]}", data[unknown[0]], f"one of the keys {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if name not in data:
            if required:
                raise VlaserveError(f"{where}.{name}", None, "a value (the key is required)")
            continue
        values[name] = _value(hints[name], data[name], f"{where}.{name}", field.metadata)
    section = cls(**values)
    if hasattr(section, "check"):
        section.check(where)
    return section


def parse_spec(raw: Mapping) -> Spec:
    """The typed spec of a mapping as spec.yaml writes it (a variant already merged in)."""
    if not isinstance(raw, Mapping):
        raise VlaserveError("spec", raw, "a mapping with the keys model, models and variants")
    top = {k: v for k, v in raw.items() if not str(k).startswith("x-")}  # x- keys are YAML anchors only
    unknown = sorted(set(top) - {"model", "models", "variants", "robots"})
    if unknown:
        raise VlaserveError(
            f"spec.{unknown[0]}", top[unknown[0]], "one of the keys ['model', 'models', 'variants', 'robots']"
        )
    robots = top.get("robots") or {}
    if not isinstance(robots, Mapping):
        raise VlaserveError("robots", robots, "a mapping of robot names to their settings")
    models = top.get("models") or {}
    if not isinstance(models, Mapping):
        raise VlaserveError("models", models, "a mapping of the models " + ", ".join([*RUNNER_MODELS, io.POLICY]))
    unknown = sorted(set(models) - {*RUNNER_MODELS, io.POLICY})
    if unknown:
        raise VlaserveError(
            f"models.{unknown[0]}", models[unknown[0]], f"one of the keys {[*RUNNER_MODELS, io.POLICY]}"
        )
    variants = top.get("variants") or {}
    if not isinstance(variants, Mapping) or not all(isinstance(v, Mapping) for v in variants.values()):
        raise VlaserveError("variants", variants, "a mapping of variant names to spec overrides (mappings)")
    spec = Spec(
        model=parse_section(ModelSettings, top.get("model") or {}, "model"),
        runners={name: parse_section(RunnerModel, models.get(name), f"models.{name}") for name in RUNNER_MODELS},
        policy=parse_section(PolicySettings, models.get(io.POLICY) or {}, f"models.{io.POLICY}"),
        variants=copy.deepcopy(dict(variants)),
        robots={name: parse_section(RobotSettings, r, f"robots.{name}") for name, r in robots.items()},
    )
    spec.check()
    return spec


def _plain(value):
    """A parsed value as spec.yaml would write it, for a message."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        return {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
    return value


def _deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_raw(path: Path, variant: str | None = None) -> dict:
    """The spec file's mapping, with ``variant``'s overrides merged in (not yet checked)."""
    if not Path(path).is_file():
        raise VlaserveError("spec", str(path), "an existing spec.yaml")
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if variant:
        variants = raw.get("variants") or {}
        if not isinstance(variants, Mapping) or variant not in variants:
            raise VlaserveError(
                "variant", variant, f"one of {sorted(variants) if isinstance(variants, Mapping) else []}"
            )
        if not isinstance(variants[variant], Mapping):
            raise VlaserveError(f"variants.{variant}", variants[variant], "a mapping of spec overrides")
        raw = _deep_merge(raw, variants[variant])
    return raw


def load_spec(path: Path, variant: str | None = None) -> Spec:
    """Read and check the spec; with ``variant``, that variant's overrides are applied first."""
    return parse_spec(load_raw(path, variant))


def variant_names(path: Path) -> list[str]:
    """The variants a spec defines, in file order."""
    return list((yaml.safe_load(Path(path).read_text()) or {}).get("variants") or {})
