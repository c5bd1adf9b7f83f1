"""Runner parameters: written by the repository, read back by the runner, every key typed and spelled once."""

from __future__ import annotations

import pytest

from tests.conftest import SPEC
from vlaserve import repository
from vlaserve.errors import VlaserveError
from vlaserve.params import GroupLimits, RunnerParams


def test_every_generated_config_reads_back_to_the_params_that_wrote_it():
    for variant in [None, *repository.load_spec(SPEC).variants]:
        spec = repository.load_spec(SPEC, variant)
        for name, config in repository.build_configs(spec, gpu_count=8).items():  # every variant fits 8 GPUs
            if config.platform == "ensemble":
                continue
            params = RunnerParams.of_model_config(config)
            written = {k: v.string_value for k, v in config.parameters.items()}
            assert params.to_config() == written, (variant, name)
            if spec.one_model:  # each step's own parameters, under its name
                assert name == "policy" and sorted(params.steps) == sorted(repository.RUNNER_MODELS), variant
                for step, step_params in params.steps.items():
                    assert step_params == repository.runner_params(spec.runners[step]), (variant, step)
                continue
            expected = repository.runner_params(spec.runners[name], repository.admission_params(name, spec))
            assert params == expected, (variant, name)


def test_types_and_groups_round_trip():
    params = RunnerParams(runtime="torchscript", cpu_threads=2, batch_buckets=(4, 1, 2), compile=True,
                          admission_role="acquire", admission_limit=64, admission_ttl_s=30.0, admission_wait_s=5.0,
                          groups={"encoder_gpu": GroupLimits(50, None)})  # fmt: skip
    config = params.to_config()
    assert config["batch_buckets"] == "1,2,4" and config["compile"] == "true" and "cuda_graphs" not in config
    assert config["mps_thread_percentage.encoder_gpu"] == "50" and config["admission_ttl_s"] == "30"
    back = RunnerParams.from_config(config)
    assert back.batch_buckets == (1, 2, 4) and back.limits("encoder_gpu").mps_thread_percentage == 50
    assert back.admission_wait_s == 5.0 and back.compile is True and back.cuda_graphs is False
    assert back == RunnerParams(**{**params.__dict__, "batch_buckets": (1, 2, 4)})  # buckets come back sorted
    odd = RunnerParams(admission_role="release", admission_limit=8, admission_ttl_s=11.234567)
    assert RunnerParams.from_config(odd.to_config()) == odd  # every digit of a float survives


@pytest.mark.parametrize(
    "config, message",
    [
        ({"runtim": "onnxruntime"}, r"parameters: runtim: got 'onnxruntime', expected one of .* \(an unknown key\)"),
        ({"cpu_threads": "two"}, "parameters: cpu_threads"),
        ({"compile": "yes"}, "parameters: compile"),
        ({"mps_thread_percentage.encoder_gpu": "half"}, "mps_thread_percentage.encoder_gpu"),
        ({"admission_role": "borrow"}, "admission_role"),
        ({"admission_role": "acquire", "admission_ttl_s": "30"}, "admission_limit: got None"),
        ({"encoder/compile": "yes"}, "parameters of step encoder: compile"),
        ({"decoder/fused": "true"}, "parameters of step decoder: fused: got 'true'"),
    ],
)
def test_a_parameter_that_does_not_fit_is_named(config, message):
    with pytest.raises(VlaserveError, match=message):
        RunnerParams.from_config(config)
