"""Several GPUs on one host, checked without one: instance groups' GPU sets resolved for 1, 2 and 8 GPUs, the
MPS limits per GPU, the per-GPU status and mps-check summaries, the sidecar's per-GPU settings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlaserve import repository
from vlaserve.errors import VlaserveError

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "model_repository" / "spec.yaml"


def gpus_of(configs) -> dict[str, list[list[int]]]:
    """Each Python-backend model's instance groups as their GPU lists."""
    return {
        name: [list(g.gpus) for g in config.instance_group]
        for name, config in configs.items()
        if config.platform != "ensemble"
    }


@pytest.mark.parametrize("gpu_count", [1, 2, 8])
def test_gpu_multi_puts_the_whole_policy_on_every_gpu(gpu_count):
    spec = repository.load_spec(SPEC, "gpu_multi")
    configs = repository.build_configs(spec, gpu_count=gpu_count)
    assert gpus_of(configs) == {"policy": [list(range(gpu_count))]}  # one model: encoder and decoder together
    group = configs["policy"].instance_group[0]
    assert group.kind == group.KIND_GPU and group.count == 1  # count is per GPU in Triton's instance groups


@pytest.mark.parametrize("gpu_count, encoder, decoder", [(2, [0], [1]), (8, [0, 2, 4, 6], [1, 3, 5, 7])])
def test_gpu_pipeline_puts_encoders_and_decoders_on_alternate_gpus(gpu_count, encoder, decoder):
    configs = repository.build_configs(repository.load_spec(SPEC, "gpu_pipeline"), gpu_count=gpu_count)
    assert gpus_of(configs) == {"encoder": [encoder], "decoder": [decoder]}
    steps = configs["policy"].ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["encoder", "decoder"]  # prefix_kv crosses from one GPU to the other


def test_gpu_pipeline_on_one_gpu_is_a_clear_error():
    with pytest.raises(VlaserveError, match=r"models.decoder.instance_groups\[0\].gpus: got 'odd'.*1 GPU"):
        repository.build_configs(repository.load_spec(SPEC, "gpu_pipeline"), gpu_count=1)


def test_gpu_ids_beyond_the_host_are_refused_and_the_single_gpu_variants_fit_any_host():
    spec = repository.load_spec(SPEC, "gpu").with_model(
        "decoder", instance_groups=[{"name": "decoder_gpu", "count": 1, "kind": "gpu", "gpus": [0, 3]}]
    )
    with pytest.raises(VlaserveError, match=r"gpus: got \[0, 3\], expected GPU ids below 2"):
        repository.build_configs(spec, gpu_count=2)
    assert gpus_of(repository.build_configs(spec, gpu_count=4))["decoder"] == [[0, 3]]
    for gpu_count in (1, 2, 8):
        assert gpus_of(repository.build_configs(repository.load_spec(SPEC, "gpu_split_mps"), gpu_count=gpu_count)) == {
            "encoder": [[0]],
            "decoder": [[0]],
        }


def test_mps_percentage_holds_on_each_gpu_of_a_group():
    from vlaserve.spec import load_raw, parse_spec

    raw = load_raw(SPEC, "gpu_multi")
    group = {"name": "policy_gpu", "count": 2, "kind": "gpu", "gpus": "all", "mps_thread_percentage": 50}
    for step in ("encoder", "decoder"):
        raw["models"][step]["instance_groups"] = [group]
    config = repository.build_configs(parse_spec(raw), gpu_count=8)["policy"]
    assert list(config.instance_group[0].gpus) == list(range(8)) and config.instance_group[0].count == 2
    assert config.parameters["mps_thread_percentage.policy_gpu"].string_value == "50"


@pytest.mark.parametrize("bad", ["first", [0, "one"], -1])
def test_a_gpu_set_that_is_neither_ids_nor_a_name_is_refused(bad):
    with pytest.raises(VlaserveError, match="instance_groups\\[0\\].gpus"):
        repository.load_spec(SPEC, "gpu").with_model(
            "encoder", instance_groups=[{"name": "e", "count": 1, "kind": "gpu", "gpus": bad}]
        )


def test_the_repository_command_writes_for_the_gpus_it_is_told(tmp_path, capsys):
    out = tmp_path / "eight"
    assert repository.main(["--variant", "gpu_multi", "--out", str(out), "--gpus", "8"]) == 0
    text = (out / "policy" / "config.pbtxt").read_text()
    assert text.count("gpus:") == 8
    assert repository.main(["--variant", "gpu_multi", "--out", str(tmp_path / "none"), "--gpus", "0"]) == 2
    assert "--gpus: got 0" in capsys.readouterr().err
    assert repository.main(["--variant", "gpu_multi", "--out", str(tmp_path / "here")]) == 0
    assert "GPU(s), " in capsys.readouterr().out  # how many it wrote for, and where that was read


def test_the_host_gpu_count_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert repository.host_gpu_count() == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert repository.host_gpu_count() == 1  # none visible: configs for a one-GPU host


def test_each_instance_limits_pinned_memory_on_its_own_gpu(monkeypatch):
    from vlaserve.params import GroupLimits
    from vlaserve.runner import apply_mps_limits, gpu_sm_total

    monkeypatch.delenv("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", raising=False)
    apply_mps_limits(GroupLimits(50, 4096), "policy_gpu_3", device_id=3)
    assert os.environ["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "3=4096M"
    assert [gpu_sm_total("132,114", i) for i in (0, 1, 2)] == [132, 114, None]
    assert gpu_sm_total("", 0) is None


def test_the_memory_pool_is_given_to_every_gpu(monkeypatch, tmp_path):
    from vlaserve.server import ServerOptions, TritonServer

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    options = ServerOptions(model_repository=tmp_path, workdir=tmp_path, cuda_memory_pool_mb=512)
    cmd, _ = TritonServer(options).command_and_env()
    pools = [a for a in cmd if a.startswith("--cuda-memory-pool-byte-size")]
    assert pools == [f"--cuda-memory-pool-byte-size={g}:{512 * 2**20}" for g in (0, 1)]


def test_mps_status_sums_up_each_gpu(tmp_path):
    from vlaserve.status import format_table, per_gpu, read_status

    instances = tmp_path / "instances"
    instances.mkdir()
    step = {"runtime": "torchscript", "value_check": "pass"}
    rows = [
        {"model": "policy", "instance": "policy_gpu_0", "pid": os.getpid(), "device": "cuda:0",
         "mps_thread_percentage": 50, "steps": {"encoder": step, "decoder": step}},
        {"model": "policy", "instance": "policy_gpu_1", "pid": os.getpid(), "device": "cuda:0",
         "mps_thread_percentage": 50, "steps": {"encoder": step, "decoder": step}},
        {"model": "policy", "instance": "policy_gpu_2", "pid": 2**22 + 7, "device": "cuda:1",
         "mps_thread_percentage": 100, "steps": {"encoder": step, "decoder": step}},
    ]  # fmt: skip
    for row in rows:
        (instances / f"{row['instance']}.json").write_text(json.dumps(row))
    summary = per_gpu(read_status(tmp_path))
    assert summary == [
        {"device": "cuda:0", "instances": "2/2", "models": "policy", "mps_thread_percentages": "50+50 = 100"},
        {"device": "cuda:1", "instances": "0/1", "models": "policy", "mps_thread_percentages": "100 = 100"},
    ]
    assert "cuda:1" in format_table(summary, ("device", "instances", "models", "mps_thread_percentages"))


def test_mps_check_counts_a_percentage_safe_only_if_right_on_every_gpu():
    from vlaserve.mps_check import format_table, safe_on_every_gpu

    def row(gpu, pct, right):
        return {"gpu_id": gpu, "percentage": pct, "right": right, "sm_count": 66, "tflops": 300.0,
                "worst": {"error": 0.0 if right else 0.5, "tolerance": 0.05, "where": "x"}}  # fmt: skip

    rows = [row(0, 50, True), row(0, 100, True), row(1, 50, False), row(1, 100, True)]
    assert safe_on_every_gpu(rows) == [100]
    assert [line.split()[0] for line in format_table(rows).splitlines()[1:]] == ["0", "0", "1", "1"]


@pytest.mark.skipif(shutil.which("nvidia-cuda-mps-control") is not None, reason="this host has MPS: it would start")
def test_the_sidecar_takes_a_pinned_memory_limit_per_gpu(tmp_path):
    def run(value):
        env = {
            **os.environ,
            "MPS_PINNED_DEVICE_MEM_LIMIT": value,
            "PATH": "/usr/bin:/bin",
            "CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "pipe"),
            "CUDA_MPS_LOG_DIRECTORY": str(tmp_path / "log"),
        }
        return subprocess.run(["bash", str(ROOT / "deploy" / "mps" / "entrypoint.sh")], env=env,
                              capture_output=True, text=True, timeout=30)  # fmt: skip

    assert "MPS_PINNED_DEVICE_MEM_LIMIT" not in run("0=40G,1=40G").stderr  # accepted (then: no MPS on this host)
    assert "expected <device>=<size>[M|G] per GPU" in run("0=40G,1=").stderr


LOCK_HOLDER = """
import json, sys, time
from pathlib import Path
from vlaserve.runner import gpu_start_lock
with gpu_start_lock(sys.argv[1], sys.argv[2]) as status:
    start = time.time()
    Path(sys.argv[3]).touch()
    time.sleep(float(sys.argv[4]))
print(json.dumps({**status, "start": start, "end": time.time()}))
"""


def hold_lock(tmp_path, key: str, name: str, seconds: float) -> tuple[subprocess.Popen, Path]:
    """A process that holds the start lock ``key`` for ``seconds``, returned once it holds it (or waits for it)."""
    marker = tmp_path / f"{name}.held"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", LOCK_HOLDER, key, str(tmp_path), str(marker), str(seconds)]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True), marker


def wait_for(marker: Path) -> None:
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline, f"{marker} never appeared"
        time.sleep(0.02)


@pytest.mark.parametrize("keys", [("gpu-a", "gpu-a"), ("gpu-a", "gpu-b")])
def test_instances_set_up_on_one_gpu_one_at_a_time(tmp_path, keys):
    """Instances on the same GPU set up (context, screen, load, compile, capture, golden check) one after the
    other, each timing its graph choices alone; on different GPUs at once. The second is started only once the
    first holds its lock."""
    first_proc, first_marker = hold_lock(tmp_path, keys[0], "first", 1.0)
    wait_for(first_marker)
    second_proc, _ = hold_lock(tmp_path, keys[1], "second", 0.1)
    first, second = (json.loads(p.communicate(timeout=60)[0]) for p in (first_proc, second_proc))
    if keys[0] == keys[1]:
        assert second["start"] >= first["end"] - 0.05 and second["gpu_start_waited_s"] > 0.3, (first, second)
    else:
        assert second["start"] < first["end"] and second["gpu_start_waited_s"] < 0.3, (first, second)


def test_an_instance_sets_up_without_the_lock_when_it_cannot_have_it(tmp_path):
    """A lock held past the timeout, or a lock directory that cannot be made, does not stop an instance: it
    sets up without the lock and its status says why. CPU instances take no lock."""
    from vlaserve.runner import gpu_key, gpu_start_lock

    holder, marker = hold_lock(tmp_path, "gpu-a", "holder", 3.0)
    wait_for(marker)
    with gpu_start_lock("gpu-a", str(tmp_path), timeout=0.3) as status:
        assert "still held after 0.3 s" in status["gpu_start_lock"], status
    holder.communicate(timeout=60)
    (tmp_path / "a-file").write_text("")
    with gpu_start_lock("gpu-a", str(tmp_path / "a-file")) as status:
        assert status["gpu_start_lock"].startswith("unavailable"), status
    with gpu_start_lock("gpu-a", str(tmp_path)) as status:  # free again
        assert set(status) == {"gpu_start_waited_s"}, status
    assert gpu_key("cpu") is None
