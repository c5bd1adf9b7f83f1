"""The fast GPU path on a machine without a GPU: CUDA graphs fall back, and the peers benchmark runs (tiny)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlaserve import repository
from vlaserve.errors import VlaserveError
from vlaserve.runtimes import load_runtime

ROOT = Path(__file__).resolve().parents[1]


def test_cuda_graphs_fall_back_to_the_module_on_cpu(tiny_repo):
    from vlaserve.client import make_request

    manifest = json.loads((tiny_repo / "encoder" / "1" / "manifest.json").read_text())
    plain = load_runtime("torchscript", tiny_repo / "encoder" / "1", list(manifest["outputs"]), "cpu")
    graphed = load_runtime("torchscript", tiny_repo / "encoder" / "1", list(manifest["outputs"]), "cuda:0")
    why_not = graphed.capture_graphs([1, 2], manifest["inputs"])
    assert "no CUDA device" in why_not and graphed.graphs is None and graphed.device == "cpu"
    request = make_request(2, 2, seed=3, vocab_size=manifest["vocab_size"])
    inputs = {k: torch.from_numpy(request[k]) for k in manifest["inputs"]}
    for got, want in zip(graphed.run(inputs), plain.run(inputs)):
        assert torch.equal(got, want)


def test_cuda_graphs_need_torchscript_and_buckets():
    for override, problem in (
        ({"runtime": "onnxruntime"}, "runtime torchscript"),
        ({"batch_buckets": []}, "batch_buckets"),
    ):
        spec = repository.load_spec(ROOT / "model_repository" / "spec.yaml", "gpu")
        spec["models"]["encoder"].update(override)
        with pytest.raises(VlaserveError, match=problem):
            repository.validate_spec(spec)
    spec = repository.load_spec(ROOT / "model_repository" / "spec.yaml", "gpu")
    config = repository.build_configs(spec)["encoder"]
    assert config.parameters["cuda_graphs"].string_value == "true"
    naive = repository.build_configs(repository.load_spec(ROOT / "model_repository" / "spec.yaml", "gpu_naive"))
    assert "cuda_graphs" not in naive["encoder"].parameters


def test_peers_benchmark_produces_table_and_results_on_cpu(tiny_repo, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peers

    out = tmp_path / "peers"
    argv = ["--preset", "tiny", "--dtype", "fp32", "--device", "cpu", "--repository", str(tiny_repo),
            "--users", "2", "--duration", "3", "--repeats", "5", "--buckets", "1,2", "--out", str(out)]  # fmt: skip
    assert peers.main(argv) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    results = doc["results"]
    assert list(results) == ["eager", "graphs", "triton_naive", "triton_tuned", "triton_tuned_mps"]
    for peer, r in results.items():
        assert r["batch1"]["p50_ms"] > 0 and r["batch1"]["n"] == 5, peer
        assert f"\n{peer.rjust(16)}" in printed or f"\n{peer}" in printed
    assert "no CUDA device" in results["graphs"]["note"]
    assert results["eager"]["vs_graphs_rel"] < 1e-5  # the served runtime computes what PyTorch does
    for peer in ("triton_naive", "triton_tuned", "triton_tuned_mps"):
        r = results[peer]
        assert r["rel_vs_inprocess_grpc"] < 1e-5 and r["rel_vs_inprocess_http"] < 1e-5, peer
        step = r["sweep"][0]
        assert step["requests"] > 0 and step["failures"] == 0, peer
        assert r["best"] is not None and r["best"]["throughput"] > 0, peer
    tuned = {s["model"]: s for s in results["triton_tuned"]["instances"]}
    assert tuned["encoder"]["cuda_graphs"] == [] and "no CUDA device" in tuned["encoder"]["cuda_graphs_note"]
    assert "cuda_graphs" not in {s["model"]: s for s in results["triton_naive"]["instances"]}["encoder"]
    assert "MPS percentages dropped" in results["triton_tuned_mps"]["note"]
    assert {c["target"].split(" ")[0] for c in doc["targets"]} == {"batch-1", "throughput", "Triton"}
    assert "target" in printed and "results.json" in printed
    assert np.load(out / "inprocess_actions.npz")["graphs"].shape == (1, 50, 32)
