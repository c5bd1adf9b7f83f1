"""What ``make export`` wrote for one model: ``<repository>/<model>/1/manifest.json`` as a typed record.

Export writes it (:meth:`Manifest.write`); the runner, the launcher, the value checks and the benchmarks
read it (:func:`read_manifest`). A manifest with a key missing or one this module does not know was written
by another version of the export, and reading it is an error that says to export again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from vlaserve import interface as io
from vlaserve.errors import VlaserveError

FORMAT = 2  # the manifest's layout; a change to its fields or their meaning raises it
REEXPORT = "a manifest of this version's export (re-export: make export)"


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """What the artifacts are exported as: it fixes the tensor shapes and dtypes of the configs. The spec's
    ``model:`` section, and what each manifest records."""

    preset: str = "tiny"
    views: int = dataclasses.field(default=2, metadata={"minimum": 1, "maximum": io.MAX_VIEWS})
    dtype: str = dataclasses.field(default="fp32", metadata={"choices": ("fp32", "fp16", "bf16")})
    # prompt positions the encoder computes on (the wire always carries MAX_TOKENS; past these, padding)
    prompt_tokens: int = dataclasses.field(default=io.MAX_TOKENS, metadata={"minimum": 1, "maximum": io.MAX_TOKENS})


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One artifact input or output: its torch dtype name (``uint8``, ``bfloat16``, ...) and its shape,
    with -1 for the batch dimension."""

    dtype: str
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Manifest:
    model: str  # the pipeline step (vlaserve.interface.PIPELINE)
    preset: str
    views: int
    dtype: str  # fp32 | fp16 | bf16
    prompt_tokens: int  # prompt positions the encoder computes on (ModelSettings.prompt_tokens)
    seed: int  # the random weights' seed (when no checkpoint was loaded)
    init_device: str  # random weights are drawn on this device's generator
    checkpoint: str | None
    vocab_size: int
    parameters: int  # of the whole policy
    inputs: dict[str, TensorSpec]  # in the artifact's argument order
    outputs: dict[str, TensorSpec]  # in the artifact's output order
    artifacts: dict[str, dict[str, dict]]  # format -> file -> {"bytes", "sha256"}
    golden: dict  # {"file", "items", "sha256"}: the golden samples every instance checks itself against
    parity: dict  # format -> batch -> output -> {"max_abs", "rel"}: the export's check of each artifact
    export_seconds: dict
    torch: str  # the torch version that exported (TorchScript artifacts need the same one)
    format: int = FORMAT

    @property
    def settings(self) -> ModelSettings:
        return ModelSettings(self.preset, self.views, self.dtype, self.prompt_tokens)

    @classmethod
    def from_dict(cls, data: dict, where: str = "manifest") -> Manifest:
        if not isinstance(data, dict):
            raise VlaserveError(where, type(data).__name__, REEXPORT)
        names = {f.name for f in dataclasses.fields(cls)}
        for key in sorted(set(data) ^ names):
            got = "missing" if key in names else f"an unknown key {key!r}"
            raise VlaserveError(f"{where}: {key}", got, REEXPORT)
        if data["format"] != FORMAT:
            raise VlaserveError(f"{where}: format", data["format"], f"format {FORMAT}, {REEXPORT}")
        tensors = {}
        for side in ("inputs", "outputs"):
            entries = data[side] if isinstance(data[side], dict) else {None: None}
            for name, spec in entries.items():
                fits = isinstance(spec, dict) and set(spec) == {"dtype", "shape"} and isinstance(spec["dtype"], str)
                if not fits or not all(isinstance(n, int) for n in spec["shape"]):
                    raise VlaserveError(f"{where}: {side}.{name}", spec, f"{{dtype, shape}} in {REEXPORT}")
                tensors.setdefault(side, {})[name] = TensorSpec(spec["dtype"], tuple(spec["shape"]))
        return cls(**{**data, **tensors})

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise VlaserveError("manifest", str(path), f"a manifest.json written by `make export` ({exc})") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def manifest_path(repo: Path, model: str) -> Path:
    """Where ``make export`` writes ``model``'s manifest in ``repo``."""
    return Path(repo) / model / "1" / io.MANIFEST_FILE


def read_manifest(repo: Path, model: str) -> Manifest:
    """``model``'s manifest in ``repo``."""
    return Manifest.read(manifest_path(repo, model))


def read_manifest_settings(repo: Path) -> ModelSettings | None:
    """The settings the first model's artifacts were exported with, or None when nothing was exported."""
    first = io.PIPELINE[0].model
    return read_manifest(repo, first).settings if manifest_path(repo, first).is_file() else None
