"""Shared fixtures: a tiny-preset export in a temporary repository and a real tritonserver over it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "model_repository" / "spec.yaml"


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """The tiny preset (2 views, fp32, seed 0) exported into a fresh repository."""
    from export.cli import main

    repo = tmp_path_factory.mktemp("repo")
    shutil.copy(SPEC, repo / "spec.yaml")
    assert main(["--repository", str(repo)]) == 0
    return repo


@pytest.fixture(scope="session")
def tiny_policy():
    """The in-process PyTorch policy with the same weights as the export (seed 0)."""
    from vlaserve.model.policy import build_policy
    from vlaserve.model.presets import get_preset

    return build_policy(get_preset("tiny", 2), seed=0)


def start_server(repo: Path, workdir: Path):
    from vlaserve.server import ServerOptions, TritonServer

    options = ServerOptions(
        model_repository=repo, http_port=0, grpc_port=0, metrics_port=0, workdir=workdir, ready_timeout=120
    )
    return TritonServer(options).start()


@pytest.fixture(scope="session")
def server(tiny_repo, tmp_path_factory):
    """A real tritonserver (the nvidia-pytriton wheel's) over the tiny repository, on free ports."""
    srv = start_server(tiny_repo, tmp_path_factory.mktemp("server"))
    yield srv
    srv.stop()
