"""The runner's parameters: what the repository writes into a model's config and the runner reads back.

Triton carries a Python-backend model's parameters as strings keyed by name. Every key and its type is
spelled here once: :meth:`RunnerParams.to_config` writes them (vlaserve.repository) and
:meth:`RunnerParams.from_config` reads them (vlaserve.runner, the launcher, mps-check). A key this module
does not know is an error, not ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from vlaserve.errors import VlaserveError

# Triton's own key, not the runner's: inputs reach the runner where they are (on the GPU when they are there).
FIXED = {"FORCE_CPU_ONLY_INPUT_TENSORS": "no"}
ADMISSION_ROLES = ("acquire", "release")  # the encoder takes a slot, the decoder gives it back


@dataclasses.dataclass(frozen=True)
class GroupLimits:
    """The MPS limits of one instance group; each instance puts them into its environment at start."""

    mps_thread_percentage: int | None = None
    mps_pinned_memory_limit_mb: int | None = None


GROUP_KEYS = tuple(f.name for f in dataclasses.fields(GroupLimits))  # keyed "<key>.<group name>"


@dataclasses.dataclass(frozen=True)
class RunnerParams:
    """One model's runner parameters. ``None`` (or empty, or false) is not written: the runner's default."""

    runtime: str = "onnxruntime"
    cpu_threads: int | None = None  # 0: the runtime's own choice
    noise_seed: int | None = None
    value_check: str | None = None  # refuse (default), warn or off (vlaserve.value_check)
    batch_buckets: tuple[int, ...] = ()  # batches are padded up to the next of these
    compile: bool = False
    cuda_graphs: bool = False
    fused_kernels: bool = False  # the decoder's Triton kernels as CUDA-graph choices: fused, triton_attention
    precision: str | None = None  # fp8: the compiled model's chosen products in float8 (vlaserve.model.fp8)
    admission_role: str | None = None  # the pipeline's in-flight limit (vlaserve.admission)
    admission_limit: int | None = None
    admission_ttl_s: float | None = None
    admission_wait_s: float | None = None
    groups: Mapping[str, GroupLimits] = dataclasses.field(default_factory=dict)
    # A policy run as one model (spec pipeline one_model): each step's own parameters, keyed "<step>/<key>";
    # the model's own runtime then only says how its inputs are read, and its groups' MPS limits apply.
    steps: Mapping[str, RunnerParams] = dataclasses.field(default_factory=dict)

    def limits(self, group: str | None) -> GroupLimits:
        return self.groups.get(group, GroupLimits()) if group else GroupLimits()

    def to_config(self) -> dict[str, str]:
        """The parameters as Triton carries them: ``{key: string}``."""
        out = {**FIXED, "runtime": self.runtime}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("runtime", "groups", "steps") or value is None or value is False or value == ():
                continue
            if isinstance(value, bool):
                out[field.name] = "true"
            elif isinstance(value, tuple):
                out[field.name] = ",".join(str(v) for v in sorted(value))
            elif isinstance(value, float):
                out[field.name] = format(value, ".15g")  # 30.0 -> "30", and every digit a float holds
            else:
                out[field.name] = str(value)
        for group, limits in self.groups.items():
            for key in GROUP_KEYS:
                if getattr(limits, key) is not None:
                    out[f"{key}.{group}"] = str(getattr(limits, key))
        for step, params in self.steps.items():
            out.update({f"{step}/{k}": v for k, v in params.to_config().items() if k not in FIXED})
        return out

    @classmethod
    def from_config(cls, params: Mapping[str, str], where: str = "parameters") -> RunnerParams:
        """Read ``{key: string}`` back; a key or value that does not fit is a VlaserveError naming it."""
        fields = {f.name: f.type for f in dataclasses.fields(cls) if f.name not in ("groups", "steps")}
        values, groups, steps = {}, {}, {}
        for key, text in params.items():
            if key in FIXED:
                continue
            if "/" in key:  # a step's own parameter (one_model), read below
                step, step_key = key.split("/", 1)
                steps.setdefault(step, {})[step_key] = text
                continue
            if key in fields:
                kind = fields[key]
            elif "." in key and key.split(".", 1)[0] in GROUP_KEYS:
                kind = "int"
            else:
                raise VlaserveError(
                    f"{where}: {key}", text, f"one of {', '.join([*fields, *GROUP_KEYS])} (an unknown key)"
                )
            try:
                value = _parse(kind, text)
            except ValueError:
                raise VlaserveError(f"{where}: {key}", text, f"a value of type {kind}") from None
            if key in fields:
                values[key] = value
            else:
                name, group = key.split(".", 1)
                groups.setdefault(group, {})[name] = value
        role = values.get("admission_role")
        if role not in (None, *ADMISSION_ROLES):
            raise VlaserveError(f"{where}: admission_role", role, f"one of {ADMISSION_ROLES}")
        for needed in ("admission_limit", "admission_ttl_s") if role else ():
            if values.get(needed) is None:
                raise VlaserveError(f"{where}: {needed}", None, f"a value beside admission_role {role}")
        return cls(
            **values,
            groups={g: GroupLimits(**v) for g, v in groups.items()},
            steps={step: cls.from_config(sub, f"{where} of step {step}") for step, sub in steps.items()},
        )

    @classmethod
    def of_model_config(cls, config) -> RunnerParams:
        """From a parsed ModelConfig (protobuf), as vlaserve.repository.read_config gives it."""
        return cls.from_config({k: v.string_value for k, v in config.parameters.items()}, f"{config.name} parameters")


def _parse(kind: str, text: str):
    """One value from its string; ``kind`` is a field's annotation as written (a string: this module uses
    ``from __future__ import annotations``). A kind it does not know is a programming error, raised as such."""
    kind = kind.replace(" | None", "")
    if kind == "bool":
        if text not in ("true", "false"):
            raise ValueError(text)
        return text == "true"
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    if kind == "tuple[int, ...]":
        return tuple(int(b) for b in text.split(",") if b)
    if kind == "str":
        return text
    raise TypeError(f"RunnerParams: no parser for a field of type {kind!r}")
