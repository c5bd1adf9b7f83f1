"""Deployment files: the compose file against the compose-spec schema, and the sidecar scripts run natively."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
HAS_MPS = shutil.which("nvidia-cuda-mps-control") is not None


def compose_schema() -> dict:
    import check_jsonschema.builtin_schemas.vendor as vendor

    return json.loads((Path(vendor.__file__).parent / "compose-spec.json").read_text())


def compose_file(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.gpu.yml", "docker-compose.cpu.yml"])
def test_compose_files_are_valid_against_the_compose_spec(name):
    import jsonschema

    jsonschema.validate(compose_file(name), compose_schema())


def test_the_gpu_form_adds_only_the_mps_sidecar_and_the_devices():
    common, gpu = compose_file("docker-compose.yml"), compose_file("docker-compose.gpu.yml")
    services = gpu["services"]
    for client in ("triton", "export"):
        assert services[client]["depends_on"]["mps"]["condition"] == "service_healthy"
        assert services[client]["ipc"] == "service:mps"
        assert set(services[client]["environment"]) == {"CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"}
        assert services[client]["volumes"] == ["mps-pipe:/tmp/nvidia-mps"]
        assert services[client]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
        extra = set(services[client]) - {
            "deploy",
            "depends_on",
            "ipc",
            "environment",
            "volumes",
            "command",
            "healthcheck",
        }
        assert not extra, f"{client}: the GPU overlay changes {extra}"
    assert services["mps"]["ipc"] == "shareable" and "mps-pipe:/tmp/nvidia-mps" in services["mps"]["volumes"]
    assert services["mps"]["user"] == common["services"]["triton"]["user"]  # the daemon serves one UID
    assert services["mps"]["restart"] == common["services"]["triton"]["restart"] == "unless-stopped"
    assert "--mps-pipe" in services["triton"]["healthcheck"]["test"]  # a dead daemon makes it unhealthy
    # /dev/shm is the IPC donor's: a shm_size on a joining service would not apply
    assert "shm_size" in services["mps"] and "shm_size" not in common["services"]["triton"]
    assert (ROOT / services["mps"]["build"]["dockerfile"]).is_file()


def test_the_cpu_form_changes_only_the_base_image_and_shared_memory():
    cpu = compose_file("docker-compose.cpu.yml")
    for name, service in cpu["services"].items():
        assert set(service) <= {"build", "image", "shm_size"}, name
        assert service["build"]["dockerfile"] == "deploy/triton/Dockerfile"
        assert set(service["build"]["args"]) == {"BASE_IMAGE", "REQUIREMENTS"}
    assert "shm_size" in cpu["services"]["triton"]


def test_the_common_stack():
    common = compose_file("docker-compose.yml")
    services = common["services"]
    assert all(p.startswith("${VLASERVE_BIND:-127.0.0.1}:") for p in services["triton"]["ports"])
    assert services["loadtest"]["profiles"] == ["loadtest"] and services["export"]["profiles"] == ["export"]
    assert services["loadtest"]["depends_on"]["triton"]["condition"] == "service_healthy"
    assert any(v.endswith(":/models:ro") for v in services["triton"]["volumes"])  # serves read-only
    assert any(v.endswith(":/models") for v in services["export"]["volumes"])  # the export writes there
    for service in services.values():
        assert (ROOT / service["build"]["dockerfile"]).is_file()


def test_docker_compose_up_from_the_repository_root_is_the_gpu_form():
    import jsonschema

    root = yaml.safe_load((ROOT / "compose.yaml").read_text())
    jsonschema.validate(root, compose_schema())
    assert [(ROOT / path).resolve() for path in root["include"][0]["path"]] == [
        (DEPLOY / "docker-compose.yml").resolve(), (DEPLOY / "docker-compose.gpu.yml").resolve()
    ]  # fmt: skip


def test_a_broken_compose_file_is_caught():
    import jsonschema

    compose = compose_file("docker-compose.gpu.yml")
    compose["services"]["triton"]["depends_on"]["mps"]["condition"] = "service_ready"  # not a compose condition
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(compose, compose_schema())


def run_script(name: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(DEPLOY / "mps" / name)], capture_output=True, text=True, timeout=60, env={**os.environ, **env}
    )


@pytest.mark.skipif(HAS_MPS, reason="this host has MPS: the GPU verification covers the sidecar")
def test_sidecar_fails_clearly_without_mps(tmp_path):
    proc = run_script("entrypoint.sh", CUDA_MPS_PIPE_DIRECTORY=str(tmp_path / "pipe"))
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "mps: error: nvidia-cuda-mps-control not found: MPS needs an NVIDIA driver with MPS on this host "
        "(is this a GPU host, and is the driver's bin directory on PATH?)"
    )
    health = run_script("healthcheck.sh")
    assert health.returncode == 1 and "nvidia-cuda-mps-control not found" in health.stderr


@pytest.mark.skipif(HAS_MPS, reason="this host has MPS")
def test_serve_with_mps_fails_clearly_without_mps(tiny_repo, tmp_path):
    from vlaserve.server import ServerOptions, TritonServer

    server = TritonServer(ServerOptions(model_repository=tiny_repo, http_port=0, grpc_port=0, metrics_port=0,
                                        workdir=tmp_path, mps=True))  # fmt: skip
    with pytest.raises(RuntimeError, match="MPS sidecar did not start"):
        server.start()
    assert server.process is None  # tritonserver was never started


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"MPS_ACTIVE_THREAD_PERCENTAGE": "150"},
            "MPS_ACTIVE_THREAD_PERCENTAGE: got '150', expected an integer in 1..100",
        ),
        (
            {"MPS_PINNED_DEVICE_MEM_LIMIT": "40G"},
            "MPS_PINNED_DEVICE_MEM_LIMIT: got '40G', expected <device>=<size>[M|G]",
        ),
    ],
)
def test_sidecar_rejects_bad_settings(env, message):
    proc = run_script("entrypoint.sh", **env)  # checked before anything is started
    assert proc.returncode == 1 and message in proc.stderr


def test_mps_limits_reach_the_environment_and_the_status(monkeypatch):
    from vlaserve.errors import VlaserveError
    from vlaserve.params import GroupLimits, RunnerParams
    from vlaserve.runner import apply_mps_limits, expected_sm_count, instance_group_of

    monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", raising=False)
    config = {"mps_thread_percentage.decoder_gpu": "40", "mps_pinned_memory_limit_mb.decoder_gpu": "2048"}
    params = RunnerParams.from_config(config)
    group = instance_group_of("decoder_gpu_0", ["encoder_gpu", "decoder_gpu"])
    assert group == "decoder_gpu"
    assert params.limits(group) == GroupLimits(40, 2048) and params.limits("encoder_gpu") == GroupLimits()
    applied = apply_mps_limits(params.limits(group), "decoder_gpu_0")
    assert applied == {"mps_thread_percentage": 40, "mps_pinned_memory_limit_mb": 2048}
    assert os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "40"
    assert os.environ["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=2048M"
    assert [expected_sm_count(p, 132) for p in (100, 80, 60, 50, 40, 25, 20, 10)] == [132, 104, 78, 66, 52, 32, 26, 12]
    with pytest.raises(VlaserveError, match="decoder_gpu_0: mps_thread_percentage"):
        apply_mps_limits(GroupLimits(mps_thread_percentage=0), "decoder_gpu_0")


def test_mps_percentages_reach_the_generated_config():
    from tests.conftest import SPEC
    from vlaserve import repository

    spec = repository.load_spec(SPEC, "gpu")
    group = {"name": "encoder_gpu", "count": 1, "kind": "gpu", "gpus": [0], "mps_thread_percentage": 60}
    spec = spec.with_model("encoder", instance_groups=[group])
    config = repository.build_configs(spec)["encoder"]
    assert config.parameters["mps_thread_percentage.encoder_gpu"].string_value == "60"
    assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU


# ---- every shipped command line of the launcher, through its real parser ----------------------------
def _after_launcher(tokens: list[str]) -> list[str] | None:
    """The arguments that follow ``vlaserve.server`` in a command, or None if it does not call it."""
    return tokens[tokens.index("vlaserve.server") + 1 :] if "vlaserve.server" in tokens else None


def _make_serve(assignments: list[str]) -> list[str]:
    """What `make serve VAR=...` runs, printed by make -n (the venv and the export taken as made)."""
    out = subprocess.run(["make", "-n", "-o", ".venv/.installed", "-o", "model_repository/encoder/1/manifest.json",
                          "serve", *assignments], cwd=ROOT, capture_output=True, text=True, check=True).stdout  # fmt: skip
    lines = [shlex.split(line) for line in out.splitlines() if "vlaserve.server" in line]
    assert len(lines) == 1, out
    return _after_launcher(lines[0])


def shipped_launcher_command_lines() -> dict[str, list[str]]:
    """{where: arguments} for every command line the project ships that starts the launcher."""
    found = {}
    # The image's entrypoint script: one launcher line for NVIDIA's image, one for the CPU form; each gets the
    # triton command of both forms (docker-compose.yml, and the GPU overlay's).
    script = (DEPLOY / "triton" / "entrypoint.sh").read_text()
    dockerfile = (DEPLOY / "triton" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["/usr/local/bin/vlaserve-entrypoint"]' in dockerfile
    assert "COPY deploy/triton/entrypoint.sh /usr/local/bin/vlaserve-entrypoint" in dockerfile
    entry_lines = [_after_launcher(shlex.split(line)) for line in script.splitlines() if "vlaserve.server" in line]
    assert len(entry_lines) == 2 and all(args[-1] == "$@" for args in entry_lines), script
    commands = {f"deploy/{name} triton command": yaml.safe_load((DEPLOY / name).read_text())["services"]["triton"]["command"]
                for name in ("docker-compose.yml", "docker-compose.gpu.yml")}  # fmt: skip
    for i, args in enumerate(entry_lines):
        for where, command in commands.items():
            found[f"deploy/triton/entrypoint.sh line {i + 1} + {where}"] = args[:-1] + command
    found["Makefile serve"] = _make_serve([])
    found["Makefile serve MPS=1"] = _make_serve(["MPS=1"])
    for doc in (ROOT / "README.md", DEPLOY / "README.md"):
        for language, block in re.findall(r"```(\w*)\n(.*?)```", doc.read_text(), re.S):
            if language not in ("", "bash", "sh"):  # a Python example, say
                continue
            for line in block.replace("\\\n", " ").splitlines():  # a command continued over lines is one line
                tokens = shlex.split(line, comments=True)
                args = _after_launcher(tokens)
                if args is not None:
                    found[f"{doc.relative_to(ROOT)}: {line.strip()}"] = args
                elif tokens[:2] == ["make", "serve"]:
                    found[f"{doc.relative_to(ROOT)}: {line.strip()}"] = _make_serve(tokens[2:])
    return found


def test_every_shipped_launcher_command_line_parses():
    """Compose, the Dockerfile, the Makefile and the READMEs' commands, through the launcher's own parser:
    a flag the launcher lacks fails here (argparse exits 2), not on a user's machine."""
    from vlaserve.server import parse_args, server_options

    lines = shipped_launcher_command_lines()
    assert len(lines) >= 5 and any("compose" in where for where in lines)
    for where, args in lines.items():
        try:
            options = server_options(parse_args(args))
        except SystemExit as exc:
            pytest.fail(f"{where}: the launcher refuses {args} (exit {exc.code})")
        if "--cuda-memory-pool-mb" in args:  # passed through, not only accepted
            assert options.cuda_memory_pool_mb == int(args[args.index("--cuda-memory-pool-mb") + 1]), where
        assert options.mps == ("--mps" in args), where


@pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("ldd") is None, reason="needs gcc and ldd")
def test_a_stub_whose_libraries_are_missing_is_refused_before_tritonserver_starts(tmp_path):
    """A base image without libpython: every stub would die at once and tritonserver would wait for them."""
    from vlaserve.errors import VlaserveError
    from vlaserve.server import check_stub_libraries

    (tmp_path / "lib.c").write_text("int answer(void) { return 42; }\n")
    (tmp_path / "main.c").write_text("int answer(void);\nint main(void) { return answer(); }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", tmp_path / "libvlaservegone.so", tmp_path / "lib.c"], check=True)
    subprocess.run(["gcc", "-o", tmp_path / "stub", tmp_path / "main.c", f"-L{tmp_path}", "-lvlaservegone"], check=True)
    check_stub_libraries(tmp_path / "stub", {**os.environ, "LD_LIBRARY_PATH": str(tmp_path)})  # all found
    (tmp_path / "libvlaservegone.so").unlink()
    with pytest.raises(VlaserveError, match=r"libvlaservegone\.so not found"):
        check_stub_libraries(tmp_path / "stub", {**os.environ, "LD_LIBRARY_PATH": str(tmp_path)})
