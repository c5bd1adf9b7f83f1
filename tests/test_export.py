"""Export: artifacts match PyTorch at batch 1 and 4; manifests; the CLI rejects bad input and writes nothing."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export import artifacts
from export.cli import main
from tests.conftest import SPEC
from vlaserve.errors import VlaserveError
from vlaserve.manifest import Manifest, ModelSettings, TensorSpec, manifest_path, read_manifest
from vlaserve.model.parity import compare, random_request

TOL = 1e-4


@pytest.mark.parametrize("batch", [1, 4])
def test_artifacts_match_pytorch(tiny_repo, tiny_policy, batch):
    req = random_request(batch, 2, 1024, seed=77 + batch)  # inputs the export never saw
    with torch.no_grad():
        prefix_kv, mask = tiny_policy.encode(req["images"], req["tokens"])
        actions = tiny_policy.decode(prefix_kv, mask, req["state"], req["noise"])
    enc_dir, dec_dir = tiny_repo / "encoder" / "1", tiny_repo / "decoder" / "1"
    enc_feed = {"images": req["images"].numpy(), "tokens": req["tokens"].numpy()}
    dec_feed = {
        "prefix_kv": prefix_kv.numpy(),
        "prefix_mask": mask.numpy(),
        "state": req["state"].numpy(),
        "noise": req["noise"].numpy(),
    }
    onnx_kv, onnx_mask = artifacts.run_onnx(enc_dir, enc_feed)
    assert compare(onnx_kv, prefix_kv)["rel"] < TOL and np.array_equal(onnx_mask, mask.numpy())
    (onnx_actions,) = artifacts.run_onnx(dec_dir, dec_feed)
    assert compare(onnx_actions, actions)["rel"] < TOL
    ts_kv, ts_mask = artifacts.run_torchscript(enc_dir, [req["images"], req["tokens"]])
    assert compare(ts_kv, prefix_kv)["rel"] < TOL and torch.equal(ts_mask, mask)
    (ts_actions,) = artifacts.run_torchscript(dec_dir, [prefix_kv, mask, req["state"], req["noise"]])
    assert compare(ts_actions, actions)["rel"] < TOL
    assert actions.abs().mean() > 0.1  # real values, not zeros


def test_manifest_records_what_was_exported(tiny_repo):
    for name in ("encoder", "decoder"):
        version = tiny_repo / name / "1"
        manifest = json.loads((version / "manifest.json").read_text())
        assert (manifest["preset"], manifest["views"], manifest["dtype"]) == ("tiny", 2, "fp32")
        for files in manifest["artifacts"].values():
            for file, info in files.items():
                assert hashlib.sha256((version / file).read_bytes()).hexdigest() == info["sha256"]
        for fmt in ("onnx", "torchscript"):
            for batch in ("batch_1", "batch_4"):
                assert all(f.get("rel", 0) < TOL for f in manifest["parity"][fmt][batch].values())
    enc = read_manifest(tiny_repo, "encoder")
    assert enc.inputs["images"] == TensorSpec("uint8", (-1, 2, 224, 224, 3))
    assert enc.outputs["prefix_kv"].shape[0] == -1 and enc.settings == ModelSettings("tiny", 2, "fp32", 48)


def test_a_manifest_of_another_export_version_is_refused(tiny_repo, tmp_path):
    data = json.loads(manifest_path(tiny_repo, "decoder").read_text())
    assert Manifest.from_dict(data) == read_manifest(tiny_repo, "decoder")
    assert json.loads(json.dumps(Manifest.from_dict(data).to_dict())) == data  # written back as read
    broken_inputs = {**data, "inputs": {"prefix_kv": {"dtype": "bfloat16"}}}
    for broken, key in (
        ({**data, "extra": 1}, "extra"),
        ({k: v for k, v in data.items() if k != "torch"}, "torch"),
        ({**data, "format": 0}, "format"),
        (broken_inputs, "inputs.prefix_kv"),
    ):
        with pytest.raises(VlaserveError, match=f"manifest: {key}.*make export"):
            Manifest.from_dict(broken)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def exported_copy(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    return repo


def bad_checkpoint(path: Path, tiny_policy) -> Path:
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in tiny_policy.state_dict().items()}
    state["state_proj.weight"] = torch.zeros(7, 7)
    save_file(state, str(path))
    return path


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--preset", "huge"], "--preset"),
        (["--views", "4"], "--views"),
        (["--views", "0"], "--views"),
        (["--views", "two"], "--views"),
        (["--dtype", "fp64"], "--dtype"),
        (["--prompt-tokens", "0"], "--prompt-tokens"),
        (["--prompt-tokens", "49"], "--prompt-tokens"),
        (["--prompt-tokens", "all"], "--prompt-tokens"),
        (["--checkpoint", "missing.safetensors"], "--checkpoint"),
        (["--checkpoint", "BAD"], "state_proj.weight"),
        (["--variant", "one_model"], "--variant"),  # its repository is written beside the export, not into it
    ],
)
def test_cli_rejects_bad_input_and_writes_nothing(exported_copy, tiny_policy, tmp_path, capsys, argv, field):
    if "BAD" in argv:
        argv = ["--checkpoint", str(bad_checkpoint(tmp_path / "bad.safetensors", tiny_policy))]
    before = snapshot(exported_copy)
    assert main([*argv, "--repository", str(exported_copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err and "expected" in err
    assert snapshot(exported_copy) == before


def test_checkpoint_is_loaded(tmp_path):
    from safetensors.torch import save_file

    from vlaserve.model.policy import build_policy
    from vlaserve.model.presets import get_preset

    policy = build_policy(get_preset("tiny", 1), seed=5)
    save_file(policy.state_dict(), str(tmp_path / "w.safetensors"))
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(SPEC, repo / "spec.yaml")
    argv = ["--views", "1", "--seed", "9", "--checkpoint", str(tmp_path / "w.safetensors"), "--repository", str(repo)]
    assert main([*argv, "--parity-batches", "2"]) == 0
    req = random_request(2, 1, 1024, seed=0)
    with torch.no_grad():
        prefix_kv, _ = policy.encode(req["images"], req["tokens"])
    (ts_kv, _) = artifacts.run_torchscript(repo / "encoder" / "1", [req["images"], req["tokens"]])
    assert compare(ts_kv, prefix_kv)["rel"] < TOL  # the checkpoint's weights (seed 5), not the seed-9 init


def test_traces_read_no_numbers_back_from_tensors(tiny_repo):
    """Sizes computed from tensor constants become device syncs on a GPU, and CUDA-graph capture fails."""
    import torch

    from export.artifacts import capture_hazards

    class SizeArithmetic(torch.nn.Module):
        def forward(self, x):
            return x.view(x.shape[0] // 2, -1)

    assert capture_hazards(torch.jit.trace(SizeArithmetic(), (torch.zeros(4, 3),)))  # the check can fail
    for name in ("encoder", "decoder"):
        assert capture_hazards(torch.jit.load(str(tiny_repo / name / "1" / "model.pt"))) == [], name
