"""The typed spec: one parse, errors that name the YAML path, and edits that are checked like the file."""

import dataclasses

import pytest
import yaml

from tests.conftest import SPEC
from vlaserve.errors import VlaserveError
from vlaserve.spec import InstanceGroup, RunnerModel, load_raw, load_spec, parse_spec, variant_names


def test_every_variant_parses_into_frozen_typed_sections():
    for variant in [None, *variant_names(SPEC)]:
        spec = load_spec(SPEC, variant)
        for model in spec.runners.values():
            assert isinstance(model, RunnerModel) and all(isinstance(g, InstanceGroup) for g in model.instance_groups)
    gpu = load_spec(SPEC, "gpu_split_mps").runners["decoder"]
    assert gpu.batch_buckets == (1, 2, 4, 8, 16) and gpu.instance_groups[0].mps_thread_percentage == 50
    assert gpu.instance_groups[0].gpus == (0,) and gpu.dynamic_batching.preferred_batch_size == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        gpu.runtime = "onnxruntime"


@pytest.mark.parametrize(
    "edit, path, expected",
    [
        (lambda r: r["models"]["encoder"]["instance_groups"][0].update(kind="tpu"),
         "models.encoder.instance_groups[0].kind", "one of ['cpu', 'gpu']"),
        (lambda r: r["models"]["decoder"]["instance_groups"][0].pop("count"),
         "models.decoder.instance_groups[0].count", "required"),
        (lambda r: r["models"]["encoder"]["dynamic_batching"].update(priority_levels=2, default_priority_level=3),
         "models.encoder.dynamic_batching.default_priority_level", "1..2"),
        (lambda r: r["models"]["encoder"].update(warmup_batch_sizes=[1, 9]), "models.encoder.warmup_batch_sizes", "1..8"),
        (lambda r: r["models"]["encoder"].update(compile="yes"), "models.encoder.compile", "true or false"),
        (lambda r: r["model"].update(views=4), "model.views", "1..3"),
        (lambda r: r["models"].update(planner={}), "models.planner", "one of the keys"),
        (lambda r: r.update(modles={}), "spec.modles", "one of the keys"),
        (lambda r: r["models"]["decoder"]["instance_groups"].append({"name": "decoder_cpu", "count": 1}),
         "models.decoder.instance_groups[1].name", "unique"),
        (lambda r: r["models"]["decoder"].update(fused_kernels=True), "models.decoder.fused_kernels", "compile"),
    ],
)  # fmt: skip
def test_a_bad_value_is_named_by_its_yaml_path(edit, path, expected):
    raw = load_raw(SPEC)
    edit(raw)
    with pytest.raises(VlaserveError) as caught:
        parse_spec(raw)
    assert caught.value.field == path and expected in caught.value.expected, caught.value


def test_with_model_checks_the_edit_as_the_file_would():
    spec = load_spec(SPEC)
    edited = spec.with_model("encoder", instance_groups=[{"name": "e", "count": 3}], cpu_threads=2)
    assert edited.runners["encoder"].instance_groups == (InstanceGroup("e", 3),)
    assert edited.runners["decoder"] == spec.runners["decoder"] and spec.runners["encoder"].cpu_threads == 1
    assert spec.with_model("policy", max_in_flight=None).policy.max_in_flight is None
    with pytest.raises(VlaserveError, match=r"models.encoder.instance_groups\[0\].count"):
        spec.with_model("encoder", instance_groups=[{"name": "e", "count": 0}])
    with pytest.raises(VlaserveError, match="models.policy.max_in_flight"):  # below the encoder's batch of 8
        spec.with_model("policy", max_in_flight=4)


def test_a_variant_is_checked_as_the_base_is(tmp_path):
    raw = load_raw(SPEC)
    raw["variants"]["broken"] = {"models": {"decoder": {"runtime": "tensorrt"}}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    assert load_spec(tmp_path / "spec.yaml").runners["decoder"].runtime == "onnxruntime"
    with pytest.raises(VlaserveError, match="models.decoder.runtime"):
        load_spec(tmp_path / "spec.yaml", "broken")
    with pytest.raises(VlaserveError, match="variant"):
        load_spec(tmp_path / "spec.yaml", "nope")


def test_an_empty_section_reads_as_absent_and_zero_means_no_limit():
    raw = load_raw(SPEC)
    raw["models"]["encoder"]["dynamic_batching"] = {}  # as `null`: no dynamic batching
    raw["models"]["decoder"]["dynamic_batching"].update(queue_timeout_microseconds=0)  # Triton: no timeout
    raw["models"]["decoder"]["compile"] = None  # a variant turning it off
    spec = parse_spec(raw)
    assert spec.runners["encoder"].dynamic_batching is None and not spec.runners["decoder"].compile
    assert spec.runners["decoder"].dynamic_batching.queue_timeout_microseconds == 0
    with pytest.raises(TypeError):
        spec.runners["encoder"] = spec.runners["decoder"]  # read-only: edits go through with_model
    with pytest.raises(VlaserveError, match="model: got 'planner'"):
        spec.with_model("planner", max_batch_size=1)
    raw["variants"] = {"broken": None}
    with pytest.raises(VlaserveError, match="variants"):
        parse_spec(raw)


def test_fused_kernels_are_the_decoders_and_reach_its_config():
    from vlaserve import repository

    spec = load_spec(SPEC, "gpu")
    assert spec.runners["decoder"].fused_kernels and not spec.runners["encoder"].fused_kernels
    configs = repository.build_configs(spec)
    assert configs["decoder"].parameters["fused_kernels"].string_value == "true"
    assert "fused_kernels" not in configs["encoder"].parameters
    with pytest.raises(VlaserveError, match="models.encoder.fused_kernels: got True, expected false: only the decoder"):
        spec.with_model("encoder", fused_kernels=True)


def test_a_one_model_policy_needs_steps_that_can_share_its_instances():
    spec = load_spec(SPEC, "one_model")
    assert spec.one_model and not load_spec(SPEC).one_model
    raw = load_raw(SPEC, "one_model")
    raw["models"]["decoder"]["instance_groups"] = [{"name": "policy_cpu", "count": 1, "kind": "cpu"}]
    with pytest.raises(VlaserveError) as caught:
        parse_spec(raw)
    assert caught.value.field == "models.decoder.instance_groups" and "one process runs every step" in str(caught.value)
    raw = load_raw(SPEC, "one_model")
    raw["models"]["decoder"]["runtime"] = "torchscript"
    with pytest.raises(VlaserveError, match=r"models.decoder.runtime: got 'torchscript', expected the encoder's"):
        parse_spec(raw)
    with pytest.raises(VlaserveError, match=r"models.encoder.warmup_batch_sizes: got 16, expected an integer in 1..8"):
        load_spec(SPEC, "gpu_one_model").with_model("policy", max_batch_size=8)
    with pytest.raises(VlaserveError, match=r"preferred_batch_size: got 8, expected an integer in 1..4"):
        spec.with_model("policy", max_batch_size=4)  # the policy is batched as the encoder says: Triton would refuse
    raw = load_raw(SPEC, "one_model")
    raw["models"]["decoder"]["value_check"] = "warn"
    with pytest.raises(VlaserveError, match=r"models.decoder.value_check: got 'warn', expected the encoder's \(None\)"):
        parse_spec(raw)
    with pytest.raises(
        VlaserveError, match="models.policy.max_in_flight: got 64, expected none with pipeline one_model"
    ):
        spec.with_model("policy", max_in_flight=64)
    with pytest.raises(VlaserveError, match=r"models.policy.pipeline: got 'chain', expected one of \['ensemble'"):
        spec.with_model("policy", pipeline="chain")


def test_fp8_is_the_compiled_encoders():
    from vlaserve import repository
    from vlaserve.params import RunnerParams

    spec = load_spec(SPEC, "gpu_one_model_fp8")
    assert spec.runners["encoder"].precision == "fp8"
    params = RunnerParams.of_model_config(repository.build_configs(spec)["policy"])
    assert params.steps["encoder"].precision == "fp8" and params.steps["decoder"].precision is None
    with pytest.raises(VlaserveError, match="models.decoder.precision: got 'fp8', expected bf16 or none"):
        spec.with_model("decoder", precision="fp8")
    with pytest.raises(VlaserveError, match="models.encoder.precision: got 'fp8', expected compile: true"):
        spec.with_model("encoder", compile=False, cuda_graphs=False)
    with pytest.raises(VlaserveError, match=r"models.encoder.precision: got 'fp4', expected one of \['bf16', 'fp8'\]"):
        spec.with_model("encoder", precision="fp4")
