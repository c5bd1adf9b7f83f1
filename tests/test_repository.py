"""The model repository spec: committed configs equal what it generates; validation names the key."""

import copy

import pytest
import yaml
from tritonclient.grpc import model_config_pb2

from tests.conftest import ROOT, SPEC
from vlaserve import interface as io
from vlaserve import repository
from vlaserve.errors import VlaserveError
from vlaserve.spec import parse_spec

REPO = ROOT / "model_repository"


def test_committed_configs_equal_the_spec_output():
    spec = repository.load_spec(SPEC)
    for name, config in repository.build_configs(spec).items():
        committed = repository.read_config(REPO / name / "config.pbtxt")
        assert isinstance(committed, model_config_pb2.ModelConfig)
        assert committed == config, f"{name}/config.pbtxt is stale: run `make configs`"
        assert (REPO / name / "config.pbtxt").read_text() == repository.render(config)
    for name in repository.RUNNER_MODELS:
        assert (REPO / name / "1" / "model.py").read_text() == repository.MODEL_PY


def test_configs_carry_batching_queue_policy_and_instances():
    configs = repository.build_configs(repository.load_spec(SPEC))
    enc = configs["encoder"]
    assert enc.backend == "python" and enc.max_batch_size == 8
    assert list(enc.dynamic_batching.preferred_batch_size) == [4, 8]
    assert enc.dynamic_batching.priority_levels == 2
    policy = enc.dynamic_batching.default_queue_policy
    assert policy.max_queue_size > 0 and policy.default_timeout_microseconds > 0
    assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
    assert (
        enc.instance_group[0].count == 2 and enc.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    )
    assert enc.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    assert [w.batch_size for w in enc.model_warmup] == [1, 8]
    dec = configs["decoder"]
    assert all(i.optional for i in dec.input)  # the runner names a missing input (see repository.py)
    ens = configs["policy"]
    assert ens.platform == "ensemble"
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["encoder", "decoder"]


def test_variants(tmp_path):
    naive = repository.build_configs(repository.load_spec(SPEC, "naive"))
    assert not naive["encoder"].HasField("dynamic_batching") and naive["encoder"].instance_group[0].count == 1
    assert repository.variant_names(SPEC)[:3] == ["naive", "batching", "batching_multi"]
    out = repository.write_repository(repository.load_spec(SPEC, "batching"), tmp_path / "v", artifacts_from=REPO)
    assert repository.read_config(out / "decoder" / "config.pbtxt").instance_group[0].count == 1


def test_pi0_shapes():
    configs = repository.build_configs(repository.load_spec(SPEC), repository.ModelSettings("pi0", 3, "bf16"))
    kv = next(o for o in configs["encoder"].output if o.name == "prefix_kv")
    assert list(kv.dims) == [18, 2, 1, 3 * 256 + 48, 256] and kv.data_type == model_config_pb2.TYPE_BF16


@pytest.mark.parametrize(
    "path, value, field",
    [
        (("models", "encoder", "runtime"), "tensorrt", "models.encoder.runtime"),
        (("models", "decoder", "max_batch_size"), 0, "models.decoder.max_batch_size"),
        (("models", "decoder", "noise_seed"), True, "models.decoder.noise_seed"),
        (("models", "encoder", "cpu_threads"), -1, "models.encoder.cpu_threads"),
        (("models", "policy", "max_batch_size"), 64, "models.policy.max_batch_size"),
        (("models", "encoder", "instance_groups"), [], "models.encoder.instance_groups"),
        (("models", "encoder", "instance_groups"), [{"name": "g", "count": 1, "kind": "tpu"}], "kind"),
        (
            ("models", "encoder", "instance_groups"),
            [{"name": "g", "count": 1, "mps_thread_percentage": 150}],
            "mps_thread_percentage",
        ),
        (("models", "encoder", "dynamic_batching", "preferred_batch_size"), [4, 16], "preferred_batch_size"),
        (("models", "encoder", "max_batchsize"), 4, "models.encoder.max_batchsize"),
        (("models", "policy", "max_in_flight"), 4, "models.policy.max_in_flight"),  # below the encoder's batch
        (("models", "decoder", "dynamic_batching", "max_queue_size"), 16, "decoder.dynamic_batching.max_queue_size"),
    ],
)
def test_bad_spec_names_the_key(path, value, field):
    spec = copy.deepcopy(yaml.safe_load(SPEC.read_text()))
    node = spec
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(VlaserveError, match=field.replace("[", r"\[")):
        parse_spec(spec)


def test_batches_are_padded_to_the_next_bucket():
    import types

    import numpy as np

    from vlaserve.runner import TritonPythonModel

    runner = TritonPythonModel()
    runner.buckets = [1, 2, 4, 8]
    runner.runtime = types.SimpleNamespace(tensor_kind="numpy")
    padded = runner._pad({"state": np.arange(6, dtype=np.float32).reshape(3, 2)}, 3)
    assert padded["state"].shape == (4, 2) and np.array_equal(padded["state"][3], [4, 5])
    assert runner._pad({"state": np.zeros((4, 2))}, 4)["state"].shape == (4, 2)
    assert runner._pad({"state": np.zeros((9, 2))}, 9)["state"].shape == (9, 2)  # beyond the buckets: as is


def test_a_torch_runtimes_batch_is_staged_once_per_input_and_padded():
    """Requests' host inputs for a torch runtime are written into one kept buffer per input, padded to the
    bucket with the last item: the same values as concatenating and padding, the buffer reused by the next
    batch and grown for a larger one; one request that fills its bucket, and an input that is not the
    request's own, are passed on as before."""
    import types

    import torch

    from vlaserve.runner import TritonPythonModel

    runner = TritonPythonModel()
    runner.buckets, runner.staging = [1, 2, 4, 8], {}
    runner.runtime = types.SimpleNamespace(tensor_kind="torch", device="cpu")
    parts = [{"state": torch.arange(i, i + 2 * n, dtype=torch.float32).reshape(n, 2),
              "tokens": torch.full((n, 3), i, dtype=torch.int64)} for i, n in ((0, 1), (10, 2))]  # fmt: skip
    batch = runner._batch(parts, 3)
    expected = torch.cat([p["state"] for p in parts])
    assert torch.equal(batch["state"], torch.cat([expected, expected[-1:]]))
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"][:, 0].tolist() == [0, 10, 10, 10]
    kept = runner.staging["state"].data_ptr()
    one = {"state": torch.ones(1, 2), "tokens": torch.zeros(1, 3, dtype=torch.int64)}
    assert runner._batch([one], 1) is one  # one request filling its bucket: as it came, nothing staged
    again = runner._batch([one, one], 2)
    assert again["state"].shape == (2, 2) and torch.equal(again["state"], torch.ones(2, 2))
    assert runner.staging["state"].data_ptr() == kept  # reused
    large = runner._batch([{"state": torch.full((5, 2), 7.0), "tokens": torch.zeros(5, 3, dtype=torch.int64)}], 5)
    assert large["state"].shape == (8, 2) and bool((large["state"] == 7.0).all())  # grown, padded to 8
    # an earlier model's output (not request-facing) is joined and padded as before, not staged
    prefix = runner._batch([{"prefix_kv": torch.ones(1, 3)}, {"prefix_kv": torch.zeros(2, 3)}], 3)
    assert prefix["prefix_kv"].shape == (4, 3) and prefix["prefix_kv"][:, 0].tolist() == [1, 0, 0, 0]
    assert "prefix_kv" not in runner.staging


def test_the_pipeline_declared_once_gives_the_configs_and_the_ensemble(monkeypatch):
    from vlaserve import interface as io

    configs = repository.build_configs(repository.load_spec(SPEC))
    steps = configs[io.POLICY].ensemble_scheduling.step
    assert [s.model_name for s in steps] == [step.model for step in io.PIPELINE] == list(repository.RUNNER_MODELS)
    for step, config in zip(io.PIPELINE, steps):
        assert set(config.input_map) == {*step.inputs, *step.checks} and set(config.output_map) == set(step.outputs)
        assert [i.name for i in configs[step.model].input] == [*step.inputs, *step.checks]
    assert [i.name for i in configs[io.POLICY].input] == [io.IMAGES, io.TOKENS, io.STATE, io.NOISE]
    assert [o.name for o in configs[io.POLICY].output] == [io.ACTIONS]
    # a request input is one no earlier step gives: with a third step between, the same four
    head = io.Step("head", inputs=("hidden",), outputs=(io.ACTIONS,))
    middle = io.Step(io.DECODER, inputs=(io.PREFIX_KV, io.PREFIX_MASK, io.STATE, io.NOISE), outputs=("hidden",))
    monkeypatch.setattr(io, "PIPELINE", (io.PIPELINE[0], middle, head))
    assert io.request_inputs() == (io.IMAGES, io.TOKENS, io.STATE, io.NOISE)


def test_a_one_model_policy_is_written_beside_the_export_with_each_steps_artifacts(tmp_path):
    """pipeline one_model: the policy is a Python model whose version folder links each step's artifacts into
    a subfolder of the step's name; the steps' own models are not written (a server loads every model)."""
    source = tmp_path / "exported"
    for name in repository.RUNNER_MODELS:
        (source / name / "1").mkdir(parents=True)
        (source / name / "1" / "model.onnx").write_text(name)
    spec = repository.load_spec(SPEC, "one_model")
    out = repository.write_repository(spec, tmp_path / "out", artifacts_from=source)
    assert sorted(p.name for p in out.iterdir()) == ["policy"]
    config = repository.read_config(out / "policy" / "config.pbtxt")
    assert config.backend == "python" and not config.platform and config.max_batch_size == spec.policy.max_batch_size
    assert [i.name for i in config.input] == list(io.request_inputs()) and [o.name for o in config.output] == [
        "actions"
    ]
    assert [g.name for g in config.instance_group] == ["policy_cpu"] and config.instance_group[0].count == 2
    for name in repository.RUNNER_MODELS:
        assert (out / "policy" / "1" / name / "model.onnx").read_text() == name
    assert (out / "policy" / "1" / "model.py").is_file()
    assert list(repository.runner_configs(out)) == ["policy"]
    other = tmp_path / "other"  # written again from another export: the links follow it
    for name in repository.RUNNER_MODELS:
        (other / name / "1").mkdir(parents=True)
        (other / name / "1" / "model.onnx").write_text(f"{name} again")
    repository.write_repository(spec, out, artifacts_from=other)
    assert (out / "policy" / "1" / "encoder" / "model.onnx").read_text() == "encoder again"
    assert repository.drain_seconds(out) == 10 + 5  # the policy's queue timeout, and 10 s for the compute
    with pytest.raises(
        VlaserveError,
        match="models.policy.pipeline: got 'one_model', expected a repository written into another folder",
    ):
        repository.write_repository(spec, source, artifacts_from=source)
    (source / "encoder" / "config.pbtxt").write_text("")
    with pytest.raises(VlaserveError, match="expected a folder without the encoder model"):
        repository.write_repository(spec, source, artifacts_from=tmp_path / "elsewhere")
