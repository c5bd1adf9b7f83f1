"""LeRobot's own PI0Policy against vlaserve's import of the checkpoint it saves: the same observation, prompt and
noise give the same actions, in-process and served by a real tritonserver.

LeRobot runs in its own virtualenv (``make test-lerobot`` makes .venv-lerobot and runs this file); without it,
``make test`` skips these tests and says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from export.checkpoint import load_checkpoint
from export.cli import main as export_main
from vlaserve.errors import VlaserveError
from vlaserve.model.parity import REL_TOLERANCE, compare, random_request
from vlaserve.model.policy import build_policy
from vlaserve.model.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "lerobot" / "reference.py"
TOL = REL_TOLERANCE["fp32"]

_tiny = get_preset("tiny", 2)
_full_res = get_preset("tiny", 3)
# pi0's own image path: frames at 224 x 224 straight into the patch embedding, no block averaging
_full_res = dataclasses.replace(_full_res, vision=dataclasses.replace(_full_res.vision, image_size=224, patch_size=28))
CASES = {"tiny": (_tiny, 2), "full_resolution": (_full_res, 1)}  # config, batch


def lerobot_python() -> str:
    wanted = os.environ.get("VLASERVE_LEROBOT_PYTHON")
    python = Path(wanted) if wanted else ROOT / ".venv-lerobot" / "bin" / "python"
    if not python.exists():
        if wanted:
            pytest.fail(f"VLASERVE_LEROBOT_PYTHON={wanted} does not exist: run make lerobot-venv")
        pytest.skip("LeRobot's reference needs .venv-lerobot: run make test-lerobot")
    return str(python)


@dataclasses.dataclass
class LeRobotRun:
    cfg: object
    checkpoint: Path
    request: dict[str, torch.Tensor]
    actions: torch.Tensor


@pytest.fixture(scope="module")
def lerobot_runs(tmp_path_factory) -> dict[str, LeRobotRun]:
    """Each case once: LeRobot builds PI0Policy with random weights, saves it, and predicts an action chunk."""
    python = lerobot_python()
    runs = {}
    for seed, (name, (cfg, batch)) in enumerate(CASES.items()):
        folder = tmp_path_factory.mktemp(f"lerobot_{name}")
        request = random_request(batch, cfg.views, cfg.vocab_size, seed=seed + 11)
        np.savez(folder / "request.npz", **{k: v.numpy() for k, v in request.items()})
        argv = [python, str(REFERENCE), "--sizes", json.dumps(dataclasses.asdict(cfg)), "--seed", str(seed)]
        argv += ["--request", str(folder / "request.npz"), "--checkpoint", str(folder / "checkpoint")]
        argv += ["--actions", str(folder / "actions.npy")]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        print(done.stdout.strip())
        actions = torch.from_numpy(np.load(folder / "actions.npy"))
        runs[name] = LeRobotRun(cfg, folder / "checkpoint", request, actions)
    return runs


def policy_actions(policy, request, joint=False) -> torch.Tensor:
    forward = policy.forward_joint if joint else policy
    with torch.no_grad():
        return forward(request["images"], request["tokens"], request["state"], request["noise"])


@pytest.mark.parametrize("case", CASES)
def test_imported_lerobot_checkpoint_gives_lerobots_actions(lerobot_runs, case):
    run = lerobot_runs[case]
    policy = build_policy(run.cfg, seed=99)
    unloaded = policy_actions(policy, run.request)
    assert load_checkpoint(policy, run.checkpoint) == "openpi"
    split, joint = policy_actions(policy, run.request), policy_actions(policy, run.request, joint=True)
    err, err_joint = compare(split, run.actions), compare(joint, run.actions)
    print(f"{case}: vlaserve vs LeRobot actions rel {err['rel']:.2e} (monolithic form {err_joint['rel']:.2e})")
    assert err["rel"] < TOL and err_joint["rel"] < TOL
    assert compare(unloaded, run.actions)["rel"] > 0.1  # the import made the difference, not the noise alone


def test_export_and_triton_serve_lerobots_actions(lerobot_runs, tmp_path):
    """``make export CHECKPOINT=<LeRobot folder>``, then a real tritonserver answers with LeRobot's actions."""
    from conftest import SPEC, start_server

    from vlaserve.client import PolicyClient

    run = lerobot_runs["tiny"]
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(SPEC, repo / "spec.yaml")
    assert export_main(["--checkpoint", str(run.checkpoint), "--repository", str(repo)]) == 0
    manifest = json.loads((repo / "encoder" / "1" / "manifest.json").read_text())
    assert manifest["checkpoint"] == str(run.checkpoint)
    server = start_server(repo, tmp_path / "server")
    try:
        served = PolicyClient(server.grpc_url).infer({k: v.numpy() for k, v in run.request.items()})
    finally:
        server.stop()
    err = compare(np.array(served), run.actions)  # a writable copy of the reply
    print(f"served over gRPC vs LeRobot actions rel {err['rel']:.2e}")
    assert err["rel"] < TOL


def rewritten(run: LeRobotRun, folder: Path, change) -> Path:
    """A copy of LeRobot's checkpoint folder whose tensors ``change`` (a function of the dict) rewrote."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(run.checkpoint, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


EXPERT_Q = "model.paligemma_with_expert.gemma_expert.model.layers.1.self_attn.q_proj.weight"


def _pi05(t):  # pi0.5's expert: a time MLP of its own and no state token
    t["model.time_mlp_in.weight"] = t.pop("model.action_time_mlp_in.weight")
    del t["model.state_proj.weight"], t["model.state_proj.bias"]


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda t: t.pop(EXPERT_Q), ["missing", EXPERT_Q.removeprefix("model.")]),
        (lambda t: t.update({"model.extra_head.weight": torch.zeros(2)}), ["unexpected", "extra_head.weight"]),
        (lambda t: t.update({EXPERT_Q: torch.zeros(8, 32)}), ["self_attn.q_proj.weight [8, 32]", "qkv_proj"]),
        (_pi05, ["pi0.5", "time_mlp_in.weight"]),
    ],
    ids=["missing", "unexpected", "shape", "pi05"],
)
def test_a_checkpoint_that_does_not_match_names_what(lerobot_runs, tmp_path, change, named):
    run = lerobot_runs["tiny"]
    folder = rewritten(run, tmp_path / "checkpoint", change)
    with pytest.raises(VlaserveError) as caught:
        load_checkpoint(build_policy(run.cfg), folder)
    message = str(caught.value)
    assert all(part in message for part in named), message


def test_config_numbers_that_differ_are_refused(lerobot_runs, tmp_path, capsys):
    run = lerobot_runs["tiny"]
    folder = rewritten(run, tmp_path / "checkpoint", lambda t: None)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "chunk_size": 10, "num_inference_steps": 5}))
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "model_repository" / "spec.yaml", repo / "spec.yaml")
    assert export_main(["--checkpoint", str(folder), "--repository", str(repo)]) == 2
    err = capsys.readouterr().err.strip()
    assert "chunk_size is 10" in err and "num_inference_steps is 5" in err, err
    assert not (repo / "encoder").exists()


def test_the_time_mlp_under_pi05s_name_is_read_as_pi0s(lerobot_runs, tmp_path):
    """Some pi0 checkpoints name the action-time MLP ``time_mlp_in``/``_out``; with a state token they are pi0's."""

    def rename(t):
        for key in [k for k in t if k.startswith("model.action_time_mlp_")]:
            t[key.replace("action_time_mlp_", "time_mlp_")] = t.pop(key)

    run = lerobot_runs["tiny"]
    policy = build_policy(run.cfg, seed=99)
    load_checkpoint(policy, rewritten(run, tmp_path / "checkpoint", rename))
    assert compare(policy_actions(policy, run.request), run.actions)["rel"] < TOL


def _openpi(t):  # openpi's PI0Pytorch saves the same module without LeRobot's "model." wrapper
    for key in list(t):
        t[key.removeprefix("model.")] = t.pop(key)


def _older(t):  # transformers before 4.52 laid PaliGemma out differently
    for key in list(t):
        new = key.replace("paligemma.model.language_model.", "paligemma.language_model.model.")
        new = new.replace("paligemma.model.vision_tower.", "paligemma.vision_tower.")
        new = new.replace("paligemma.model.multi_modal_projector.", "paligemma.multi_modal_projector.")
        t[new.replace("paligemma.lm_head.", "paligemma.language_model.lm_head.")] = t.pop(key)


def _embedding_saved(t):  # the token embedding under its own name, the tied head dropped
    head = "model.paligemma_with_expert.paligemma.lm_head.weight"
    t["model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"] = t.pop(head)


@pytest.mark.parametrize("change", [_openpi, _older, _embedding_saved], ids=["openpi", "older_layout", "embedding"])
def test_the_other_layouts_of_the_same_weights_give_the_same_actions(lerobot_runs, tmp_path, change):
    run = lerobot_runs["tiny"]
    folder = rewritten(run, tmp_path / "checkpoint", change)
    if change is _openpi:  # and openpi's own config.json
        (folder / "config.json").write_text(
            json.dumps({"action_dim": 32, "action_horizon": 50, "precision": "float32"})
        )
    policy = build_policy(run.cfg, seed=99)
    assert load_checkpoint(policy, folder) == "openpi"
    assert compare(policy_actions(policy, run.request), run.actions)["rel"] < TOL


def test_a_bf16_checkpoint_loads_into_fp32_within_bf16s_rounding(lerobot_runs, tmp_path):
    run = lerobot_runs["tiny"]
    folder = rewritten(run, tmp_path / "checkpoint", lambda t: t.update({k: v.bfloat16() for k, v in t.items()}))
    policy = build_policy(run.cfg, seed=99)
    load_checkpoint(policy, folder)
    assert compare(policy_actions(policy, run.request), run.actions)["rel"] < REL_TOLERANCE["bf16"]


def _collision(t):  # the same tensor under its pi0 and its older name: which is meant cannot be told
    key = "model.action_time_mlp_in.weight"
    t[key.replace("action_time_mlp_in", "time_mlp_in")] = t[key] + 1


def _adaptive_norms(t):  # pi0.5's expert norms are small dense layers
    t["model.paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.dense.weight"] = torch.zeros(3, 32)
    del t["model.state_proj.weight"], t["model.state_proj.bias"]


@pytest.mark.parametrize(
    "change, named",
    [(_collision, ["one tensor per name", "time_mlp_in.weight"]), (_adaptive_norms, ["pi0.5", ".dense.weight"])],
    ids=["collision", "adaptive_norms"],
)
def test_ambiguous_or_pi05_checkpoints_are_refused(lerobot_runs, tmp_path, change, named):
    run = lerobot_runs["tiny"]
    with pytest.raises(VlaserveError) as caught:
        load_checkpoint(build_policy(run.cfg), rewritten(run, tmp_path / "checkpoint", change))
    assert all(part in str(caught.value) for part in named), str(caught.value)


def test_a_checkpoint_of_another_size_names_its_depths(lerobot_runs):
    run = lerobot_runs["full_resolution"]  # depths as tiny's, but 3 cameras
    with pytest.raises(VlaserveError, match="3 cameras"):
        load_checkpoint(build_policy(get_preset("tiny", 2)), run.checkpoint)
    deeper = dataclasses.replace(_tiny, prefix=dataclasses.replace(_tiny.prefix, depth=3),
                                 expert=dataclasses.replace(_tiny.expert, depth=3))  # fmt: skip
    with pytest.raises(VlaserveError, match=r"its depths are \{'vision': 2, 'prefix': 2, 'expert': 2\}: export with "
                       r"--preset tiny"):  # fmt: skip
        load_checkpoint(build_policy(deeper), lerobot_runs["tiny"].checkpoint)


def test_the_config_beside_a_weights_file_given_directly_is_read(lerobot_runs, tmp_path):
    folder = rewritten(lerobot_runs["tiny"], tmp_path / "checkpoint", lambda t: None)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "chunk_size": "50"}))  # a string, not the number
    with pytest.raises(VlaserveError, match="chunk_size is '50'"):
        load_checkpoint(build_policy(lerobot_runs["tiny"].cfg), folder / "model.safetensors")


def test_the_lerobot_peer_benchmark_times_lerobot_and_checks_its_actions(tmp_path):
    """benchmarks/lerobot_peer.py (the GPU peer run, here at the tiny sizes on the CPU): it times LeRobot's
    PI0Policy in bf16 and compares its actions with the same weights in float32; the comparison is real
    (bf16 differs from float32, within the bf16 tolerance)."""
    out = tmp_path / "lerobot.json"
    argv = [lerobot_python(), str(ROOT / "benchmarks" / "lerobot_peer.py"), "--preset", "tiny", "--device", "cpu",
            "--dtype", "bfloat16", "--repeats", "2", "--out", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert result["transformers"] == "4.53.2" and result["parameters"] > 1e6
    assert row["p50_ms"] > 0 and row["finite"] and not row["void"]
    assert 1e-4 < row["rel_to_float32"] < REL_TOLERANCE["bf16"], row
    assert "[lerobot] PI0Policy bfloat16" in done.stdout
