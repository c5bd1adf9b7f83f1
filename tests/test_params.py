"""Runner parameters: written by the repository, read back by the runner, every key typed and spelled once."""

from __future__ import annotations

import pytest

from tests.conftest import SPEC
from vlaserve import repository
from vlaserve.errors import VlaserveError
from vlaserve.params import GroupLimits, RunnerParams


def test_every_generated_config_reads_back_to_the_params_that_wrote_it():
    for variant in [None, *repository.load_spec(SPEC)["variants"]]:
        spec = repository.load_spec(SPEC, variant)
        for name, config in repository.build_configs(spec).items():
            if name not in repository.RUNNER_MODELS:
                continue
            params = RunnerParams.of_model_config(config)
            written = {k: v.string_value for k, v in config.parameters.items()}
            assert params.to_config() == written, (variant, name)
            expected = repository.runner_params(spec["models"][name], repository.admission_params(name, spec["models"]))
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


@pytest.mark.parametrize(
    "config, message",
    [
        ({"runtim": "onnxruntime"}, "parameters: runtim"),  # a misspelt key is named, not ignored
        ({"cpu_threads": "two"}, "parameters: cpu_threads"),
        ({"compile": "yes"}, "parameters: compile"),
        ({"mps_thread_percentage.encoder_gpu": "half"}, "mps_thread_percentage.encoder_gpu"),
        ({"admission_role": "borrow"}, "admission_role"),
    ],
)
def test_a_parameter_that_does_not_fit_is_named(config, message):
    with pytest.raises(VlaserveError, match=message):
        RunnerParams.from_config(config)
