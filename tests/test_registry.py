"""Runtimes and artifact formats come from two registries: adding a runtime touches its class
(vlaserve.runtimes.RUNTIMES), its format's exporter if the format is new (export.artifacts.EXPORTERS), and the
spec. An unknown format is an error, never a fallback to another one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from export import artifacts
from export.cli import main as export_main
from tests.conftest import SPEC
from vlaserve import interface as io
from vlaserve import repository, runtimes
from vlaserve.errors import VlaserveError
from vlaserve.manifest import read_manifest
from vlaserve.model.parity import REL_TOLERANCE
from vlaserve.value_check import golden_batch, load_golden

TOY_FILE = "model.toy"


def write_toy(module, example, input_names, output_names, out_dir: Path) -> list[str]:
    """The toy format: the whole module, pickled by torch.save."""
    torch.save(module, out_dir / TOY_FILE)
    return [TOY_FILE]


def run_toy(out_dir: Path, inputs: dict) -> tuple:
    module = torch.load(out_dir / TOY_FILE, weights_only=False)
    with torch.no_grad():
        out = module(*inputs.values())
    return out if isinstance(out, tuple) else (out,)


class ToyRuntime:
    format, tensor_kind, device = "toy", "torch", "cpu"

    def __init__(self, version_dir, output_names, device="cpu", threads=0):
        self.version_dir, self.output_names = Path(version_dir), list(output_names)

    def __call__(self, inputs: dict) -> list:
        return list(run_toy(self.version_dir, inputs))


def spec_with(tmp_path: Path, runtime: str) -> Path:
    spec = yaml.safe_load(SPEC.read_text())
    spec["models"][io.ENCODER]["runtime"] = runtime
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / repository.SPEC_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
    return repo


def test_a_toy_runtime_added_through_the_registries_is_exported_checked_configured_and_served(tmp_path, monkeypatch):
    monkeypatch.setitem(artifacts.EXPORTERS, "toy", artifacts.Exporter(write_toy, run_toy, ("fp32",), (TOY_FILE,)))
    monkeypatch.setitem(runtimes.RUNTIMES, "toy", ToyRuntime)
    repo = spec_with(tmp_path, "toy")
    assert export_main(["--repository", str(repo)]) == 0

    version = repo / io.ENCODER / "1"
    manifest = read_manifest(repo, io.ENCODER)
    assert (version / TOY_FILE).is_file() and set(manifest.artifacts) == {"onnx", "torchscript", "toy"}
    assert manifest.parity["toy"]["batch_1"]  # export ran the toy artifact back and checked it
    config = repository.read_config(version.parent / repository.CONFIG_FILE)
    assert config.parameters["runtime"].string_value == "toy"

    runtime = runtimes.load_runtime("toy", version, manifest.outputs)
    inputs, expected = golden_batch(load_golden(version), 2)
    for got, (name, want) in zip(runtime(inputs), expected.items()):
        err = (got.float() - want.float()).norm() / max(want.float().norm(), 1e-12)
        assert err <= REL_TOLERANCE["fp32"], name


def test_a_runtime_whose_format_no_exporter_writes_is_refused_before_any_work(tmp_path, monkeypatch):
    class Ghost(ToyRuntime):
        format = "ghost"

    monkeypatch.setitem(runtimes.RUNTIMES, "ghost", Ghost)
    repo = spec_with(tmp_path, "ghost")
    assert export_main(["--repository", str(repo)]) == 2
    assert not (repo / io.ENCODER / "1").exists()


def test_an_unknown_format_is_an_error_never_a_fallback():
    with pytest.raises(VlaserveError, match="artifact format: got 'nope'"):
        artifacts.exporter("nope")
    assert artifacts.formats_for("bf16") == ("torchscript",)
    assert artifacts.formats_for("fp32") == ("onnx", "torchscript")


def test_a_spec_naming_an_unregistered_runtime_is_refused(tmp_path):
    shutil.copy(SPEC, tmp_path / "spec.yaml")
    spec = yaml.safe_load(SPEC.read_text())
    spec["models"][io.ENCODER]["runtime"] = "tensorrt"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(VlaserveError, match="models.encoder.runtime"):
        repository.load_spec(tmp_path / "spec.yaml")
