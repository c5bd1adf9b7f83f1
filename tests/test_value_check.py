"""The value checks every instance runs before it reports ready, and ``make mps-check`` (CPU parts)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from tests.conftest import ROOT, SPEC, start_server
from vlaserve import repository, value_check
from vlaserve.errors import VlaserveError
from vlaserve.manifest import ModelSettings, read_manifest, read_manifest_settings
from vlaserve.model.parity import compare
from vlaserve.runtimes import load_runtime
from vlaserve.status import format_table, read_status


def test_export_writes_golden_samples_the_policy_reproduces(tiny_repo, tiny_policy):
    encoder, decoder = (value_check.load_golden(tiny_repo / m / "1") for m in repository.RUNNER_MODELS)
    for model in repository.RUNNER_MODELS:
        golden = read_manifest(tiny_repo, model).golden
        assert golden["file"] == value_check.GOLDEN_FILE and golden["items"] == value_check.GOLDEN_ITEMS
    images, tokens = encoder["inputs"]["images"], encoder["inputs"]["tokens"]
    assert len(images) == value_check.GOLDEN_ITEMS and not torch.equal(images[0], images[1])  # two requests
    with torch.no_grad():
        prefix_kv, mask = tiny_policy.encode(images, tokens)
        actions = tiny_policy.decode(prefix_kv, mask, decoder["inputs"]["state"], decoder["inputs"]["noise"])
    assert compare(encoder["outputs"]["prefix_kv"], prefix_kv)["rel"] < 1e-6
    assert torch.equal(
        decoder["inputs"]["prefix_kv"], encoder["outputs"]["prefix_kv"]
    )  # the decoder's from the encoder's
    assert compare(decoder["outputs"]["actions"], actions)["rel"] < 1e-6
    assert actions.abs().mean() > 0.1


def test_products_are_recorded_from_the_model_at_each_batch_size(tiny_repo):
    products = value_check.record_products(read_manifest(tiny_repo, "decoder"), [1, 4])
    assert products and {p["op"] for p in products} <= set(value_check.PRODUCT_OPS)
    by_batch = {b: [p for p in products if p["batch"] == b] for b in (1, 4)}
    assert by_batch[1] and by_batch[4]
    # the action expert's projections see 4 times the rows at batch 4 (the written-out attention's too)
    first_dims = {p["shapes"][0][0] for p in by_batch[4] if p["op"] == "linear"}
    assert 4 in first_dims


def test_recorded_products_are_kept_for_the_next_start(tiny_repo, tmp_path, monkeypatch):
    manifest = read_manifest(tiny_repo, "decoder")
    first = value_check.cached_products(manifest, [1, 2], tmp_path)
    assert len(list(tmp_path.glob("decoder-*.json"))) == 1

    def not_again(*args):
        raise AssertionError("recorded again")

    monkeypatch.setattr(value_check, "record_products", not_again)
    assert value_check.cached_products(manifest, [2, 1], tmp_path) == first  # same sizes, any order
    with pytest.raises(AssertionError, match="recorded again"):
        value_check.cached_products(manifest, [1, 4], tmp_path)  # other sizes: recorded anew


def test_product_screen_passes_right_products_and_catches_a_wrong_tile(tiny_repo, monkeypatch):
    products = value_check.record_products(read_manifest(tiny_repo, "encoder"), [1, 2])
    right = value_check.screen_products(products, "fp32", "cpu")
    assert value_check.passed(right) and right["products"] == len(products) and right["worst"] < 1e-5
    monkeypatch.setenv(value_check.FAULT_ENV, "products")
    wrong = value_check.screen_products(products, "fp32", "cpu")
    assert not value_check.passed(wrong) and wrong["worst"] > 0.1 and "batch" in wrong["where"]


def test_golden_check_through_a_runtime_catches_wrong_outputs(tiny_repo):
    version = tiny_repo / "decoder" / "1"
    runtime = load_runtime("torchscript", version, ["actions"])
    golden = value_check.load_golden(version)
    right = value_check.check_golden(runtime.run, golden, [1, 3], "fp32")
    assert value_check.passed(right) and right["batches"] == [1, 3]

    def off_by_two_percent(inputs):
        return [out * 1.02 for out in runtime.run(inputs)]

    wrong = value_check.check_golden(off_by_two_percent, golden, [1, 3], "fp32")
    assert not value_check.passed(wrong) and wrong["worst"] == pytest.approx(0.02, rel=1e-3)


def test_served_instances_report_their_checks(server):
    rows = read_status(server.options.workdir)
    assert len(rows) == 4
    for row in rows:
        assert row["value_check"] == "pass", row
        assert row["products_check"]["products"] > 0 and row["products_check"]["worst"] < 1e-4
        assert row["golden_check"]["batches"] == [1, 8] and row["golden_check"]["worst"] < 1e-4
    table = format_table(rows)
    assert "value_check" in table.splitlines()[0] and table.count(" pass ") == 4


def copy_repo(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_a_corrupted_golden_sample_refuses_to_load_and_the_start_fails(tiny_repo, tmp_path):
    repo = copy_repo(tiny_repo, tmp_path / "repo")
    path = repo / "decoder" / "1" / value_check.GOLDEN_FILE
    golden = torch.load(path, weights_only=True)
    golden["outputs"]["actions"] = golden["outputs"]["actions"] * 1.1
    torch.save(golden, path)
    with pytest.raises(RuntimeError) as failed:  # not the TimeoutError of a start that hung until the deadline
        start_server(repo, tmp_path / "server")
    first = str(failed.value).splitlines()[0]
    assert first.startswith("vlaserve value check failed: decoder_cpu_")
    assert "golden-sample outputs wrong, worst error 0.0909 (tolerance 0.0001) at actions at batch" in first
    assert "mps-check" not in first  # a CPU instance: no MPS advice
    refused = [r for r in read_status(tmp_path / "server") if r["model"] == "decoder"]
    assert refused and all(r["value_check"] == "FAILED golden, refused" for r in refused)


def test_a_wrong_product_refuses_to_load_or_only_warns_if_told(tiny_repo, tmp_path, monkeypatch):
    monkeypatch.setenv(value_check.FAULT_ENV, "products")  # every screened product gets a zeroed tile
    with pytest.raises(RuntimeError, match="fp32 matrix products wrong, worst error"):
        start_server(tiny_repo, tmp_path / "refused")
    spec = repository.load_spec(SPEC)
    for model in repository.RUNNER_MODELS:
        spec = spec.with_model(model, value_check="warn")
    settings = read_manifest_settings(tiny_repo)
    warned = repository.write_repository(spec, tmp_path / "warn_repo", settings, artifacts_from=tiny_repo)
    server = start_server(warned, tmp_path / "warned")
    try:
        rows = read_status(tmp_path / "warned")
        assert {r["value_check"] for r in rows} == {"FAILED products, serving anyway (warn)"}
        assert "value_check: warn, so serving anyway" in server.options.log_file.read_text()
    finally:
        server.stop()


def test_value_check_setting_is_validated_and_reaches_the_config():
    spec = repository.load_spec(SPEC, "gpu")
    assert repository.build_configs(spec)["decoder"].parameters["value_check"].string_value == "refuse"
    with pytest.raises(VlaserveError, match="models.decoder.value_check"):
        spec.with_model("decoder", value_check="maybe")


def test_safe_percentages_and_the_refusal_line(tmp_path):
    report = tmp_path / "mps-check.json"
    rows = [{"percentage": p, "right": p in (25, 50, 100)} for p in (25, 40, 50, 60, 100)]
    pi0 = ModelSettings("pi0", 2, "bf16")
    report.write_text(json.dumps({"gpu": "NVIDIA H200", "model": value_check.model_key(pi0), "rows": rows}))
    assert value_check.safe_percentages("NVIDIA H200", pi0, str(report)) == [25, 50, 100]
    assert value_check.safe_percentages("NVIDIA H100 80GB HBM3", pi0, str(report)) is None  # another GPU
    assert (
        value_check.safe_percentages("NVIDIA H200", ModelSettings("pi0", 2, "fp16"), str(report)) is None
    )  # another model
    result = {"worst": float("inf"), "tolerance": 0.02, "where": "linear 2x256x1152 x 3456x1152 (batch 1)"}
    line = value_check.refusal_line("encoder_gpu_0", "NVIDIA H200, mps_thread_percentage 40 (52 SMs)",
                                    "bf16 matrix products", result, True, [25, 50, 100])  # fmt: skip
    assert line == (
        "vlaserve value check failed: encoder_gpu_0 on NVIDIA H200, mps_thread_percentage 40 (52 SMs): bf16 matrix "
        "products wrong, worst error inf (tolerance 0.02) at linear 2x256x1152 x 3456x1152 (batch 1); "
        "make mps-check found these thread percentages right on this GPU: 25, 50, 100"
    )
    unknown = value_check.refusal_line("e", "s", "c", result, True, None)
    assert unknown.endswith("run `make mps-check` to find the thread percentages that are right on this GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_mps_check_on_a_machine_without_a_gpu_is_a_clear_error(tiny_repo):
    done = subprocess.run(["make", "-s", "mps-check", f"REPO={tiny_repo}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0
    assert "mps-check: error: GPU: got 'none visible" in done.stderr and "Traceback" not in done.stderr


def test_mps_check_child_screens_products_and_golden_samples(tiny_repo, monkeypatch):
    from vlaserve.mps_check import check_share, format_table, model_products

    products = model_products(tiny_repo)
    row = check_share(tiny_repo, golden=True, device="cpu", products=products)
    assert row["right"] and row["worst"]["error"] < 1e-4
    assert {"encoder_products", "encoder_golden", "decoder_products", "decoder_golden"} <= set(row)
    monkeypatch.setenv(value_check.FAULT_ENV, "products")
    wrong = check_share(tiny_repo, golden=False, device="cpu", products=products)
    assert not wrong["right"] and wrong["worst"]["error"] > 0.1
    table = format_table([{"percentage": 40, **wrong}, {"percentage": 50, **row}])
    assert "WRONG" in table.splitlines()[1] and "right" in table.splitlines()[2]


def test_mps_check_names_each_missing_piece(tiny_repo, tmp_path, monkeypatch):
    import vlaserve.server
    from vlaserve import mps_check

    monkeypatch.setattr(vlaserve.server, "gpu_sm_counts", lambda: [132])  # pretend a GPU is there
    monkeypatch.setattr(mps_check.shutil, "which", lambda name: None)
    with pytest.raises(VlaserveError, match="nvidia-cuda-mps-control not on PATH"):
        mps_check.preflight(tiny_repo)
    monkeypatch.setattr(mps_check.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(mps_check.os, "geteuid", lambda: 1234)
    with pytest.raises(VlaserveError, match="user: got 'uid 1234', expected root"):
        mps_check.preflight(tiny_repo)
    with pytest.raises(VlaserveError, match="an exported model repository"):
        mps_check.preflight(tmp_path)
    # a control pipe there that belongs to another user (the file's owner is not uid 1234)
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    (tmp_path / "mps-pipe").mkdir()
    (tmp_path / "mps-pipe" / "control").write_text("")
    with pytest.raises(
        VlaserveError, match=r"MPS daemon: got '.*control owned by uid \d+', expected a daemon of this user"
    ):
        mps_check.MpsDaemon(tmp_path).start()


def test_mps_check_percentages_include_the_spec_and_are_validated():
    from vlaserve import mps_check

    assert {50, 100} <= mps_check.spec_percentages(SPEC)
    assert mps_check.parse_args(["--percentages", "25,50"]).percentages == {25, 50}
    with pytest.raises(SystemExit):
        mps_check.parse_args(["--percentages", "0,50"])
