"""The Helm chart (deploy/helm/vlaserve), rendered by a real helm and checked offline: every object against
Kubernetes' own OpenAPI schemas (unknown fields rejected), the PodMonitor against the Prometheus operator's,
probes and ports against the interface module and a real tritonserver, image and commands against compose.

No cluster runs here: what these tests cannot show is listed in deploy/README.md ("Kubernetes")."""

from __future__ import annotations

import copy
import functools
import os
import platform
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from vlaserve import interface as io

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "vlaserve"
KUBE_VERSIONS = ("1.29.0", "1.37.0")  # the oldest and the newest schemas checked
PORTS = {"http": io.HTTP_PORT, "grpc": io.GRPC_PORT, "metrics": io.METRICS_PORT, "ws": io.GATEWAY_PORT}
ALL_OPTIONS = {  # every optional object on, and the non-default paths of the templates
    "persistence": {"enabled": True, "storageClassName": "fast"},
    "gpuSharing": {"mpsReplicas": 2},
    "triton": {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"},
               "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    "model": {"checkpoint": "/models/checkpoint"},
    "imagePullSecrets": [{"name": "registry"}],
}  # fmt: skip
# two GPUs per pod, the whole policy on each (MPS sharing is for one GPU per pod)
MULTI_GPU = {"triton": {"gpusPerPod": 2}, "model": {"servedVariant": "gpu_multi", "checkpoint": "/models/ckpt"}}


def helm_binary() -> str:
    helm = Path(sys.executable).parent / "helm"
    if not helm.exists():
        if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
            pytest.skip("no helm for this platform in .venv/bin (deploy/helm/get_helm.py fetches Linux x86-64's)")
        pytest.fail(f"{helm} is missing: make venv fetches it (deploy/helm/get_helm.py)")
    return str(helm)


def run_helm(*args, values: dict | None = None, tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HELM_CACHE_HOME": str(tmp / "cache"), "HELM_CONFIG_HOME": str(tmp / "config"),
           "HELM_DATA_HOME": str(tmp / "data")}  # fmt: skip
    argv = [helm_binary(), *args]
    if values is not None:
        (tmp / "values.yaml").write_text(yaml.safe_dump(values))
        argv += ["-f", str(tmp / "values.yaml")]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)


def render(tmp: Path, values: dict | None = None) -> list[dict]:
    done = run_helm("template", "rel", str(CHART), "--kube-version", KUBE_VERSIONS[0], values=values, tmp=tmp)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def by_kind(objects: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for obj in objects:
        out.setdefault(obj["kind"], []).append(obj)
    return out


@functools.cache
def _crd_schema(kind: str) -> dict:
    """The Prometheus operator's schema of ``kind``, from its typed models, with unknown fields rejected."""
    from cloudcoil.models.prometheus_operator import v1

    def strict(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                strict(value)
        elif isinstance(node, list):
            for value in node:
                strict(value)
        return node

    return strict(getattr(v1, kind).model_json_schema(by_alias=True, mode="validation"))


def problems(obj: dict) -> list[str]:
    """Every schema error of one object (empty: valid), against each Kubernetes version checked."""
    import jsonschema
    import kubernetes_validate

    if obj["apiVersion"] == "monitoring.coreos.com/v1":
        validator = jsonschema.Draft202012Validator(_crd_schema(obj["kind"]))
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    found = []
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            found.append(f"{version} {'.'.join(map(str, exc.path))}: {exc.message}")
    return found


def test_the_chart_lints(tmp_path):
    done = run_helm("lint", str(CHART), "--strict", tmp=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("values", [None, ALL_OPTIONS, MULTI_GPU], ids=["defaults", "all_options", "multi_gpu"])
def test_every_rendered_object_is_valid_against_the_kubernetes_schemas(tmp_path, values):
    objects = render(tmp_path, values)
    kinds = by_kind(objects)
    expected = {"Deployment": 2, "Service": 3, "HorizontalPodAutoscaler": 1, "PodDisruptionBudget": 1,
                "PodMonitor": 1, "ConfigMap": 1}  # fmt: skip
    if values is ALL_OPTIONS:
        expected.update(PersistentVolumeClaim=1, ConfigMap=2)  # the claim, and the device plugin's MPS config
    assert {k: len(v) for k, v in kinds.items()} == expected
    for obj in objects:
        assert problems(obj) == [], f"{obj['kind']} {obj['metadata']['name']}"


def test_the_schema_check_rejects_unknown_fields_and_wrong_types(tmp_path):
    for obj in render(tmp_path, ALL_OPTIONS):
        unknown = copy.deepcopy(obj)
        (unknown["spec"] if "spec" in obj else unknown)["replicaz"] = 2
        assert problems(unknown), f"an unknown field in a {obj['kind']} passed"
        if obj["kind"] == "Deployment":  # deep inside too: a misspelt container field
            nested = copy.deepcopy(obj)
            nested["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
            assert problems(nested), "an unknown container field passed"
        wrong = copy.deepcopy(obj)
        wrong["metadata"]["labels"] = "not-a-mapping"
        assert problems(wrong), f"a wrong type in a {obj['kind']} passed"


def containers(deployment: dict) -> dict[str, dict]:
    spec = deployment["spec"]["template"]["spec"]
    return {c["name"]: c for c in [*spec.get("initContainers", []), *spec["containers"]]}


def test_probes_and_ports_are_tritons_own(tmp_path, server):
    kinds = by_kind(render(tmp_path))
    deployments = {d["metadata"]["name"].rsplit("-", 1)[1]: containers(d) for d in kinds["Deployment"]}
    triton, gateway = deployments["triton"], deployments["gateway"]
    for container in (triton["triton"], gateway["gateway"]):
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert all(PORTS[name] == port for name, port in ports.items())
    for service in kinds["Service"]:
        assert all(PORTS[p["name"]] == p["port"] for p in service["spec"]["ports"])
    pods = next(s for s in kinds["Service"] if s["metadata"]["name"].endswith("-triton-pods"))
    assert pods["spec"]["clusterIP"] == "None"  # one address per pod: the gateway spreads its requests over them
    assert gateway["gateway"]["args"][1] == f"dns:///{pods['metadata']['name']}:{io.GRPC_PORT}"
    paths = {
        name: triton["triton"][name]["httpGet"]["path"] for name in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert paths == {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready",
                     "livenessProbe": "/v2/health/live"}  # fmt: skip
    for path in set(paths.values()):  # answered by a real server through the launcher's HTTP front
        assert urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=5).status == 200
    assert gateway["gateway"]["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert '"/healthz"' in (ROOT / "vlaserve" / "gateway.py").read_text()
    monitor = kinds["PodMonitor"][0]["spec"]["podMetricsEndpoints"][0]
    assert monitor["port"] == "metrics" and monitor["path"] == "/metrics"


def test_image_and_commands_are_the_ones_compose_runs(tmp_path, tiny_repo):
    from export.cli import parse_args as export_args
    from vlaserve import repository
    from vlaserve.gateway import parse_args as gateway_args
    from vlaserve.server import parse_args as server_args

    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    kinds = by_kind(render(tmp_path, MULTI_GPU))
    pods = [c for d in kinds["Deployment"] for c in containers(d).values()]
    assert {c["image"] for c in pods} == {compose["x-image"]["image"]}
    triton = next(c for c in pods if c["name"] == "triton")
    assert "command" not in triton  # the image's entrypoint: the launcher, as compose's triton service
    options = server_args(triton["args"])
    assert str(options.model_repository) == "/serve/repository" and options.cuda_memory_pool_mb == 2048
    assert options.ready_timeout == 900  # the launcher waits as long as the startup probe does
    gateway = next(c for c in pods if c["name"] == "gateway")
    assert gateway["command"] == compose["services"]["gateway"]["entrypoint"][:3]
    assert gateway_args(gateway["args"]).robot == "droid"
    export = next(c for c in pods if c["name"] == "export")
    assert "python3 -m export" in export["command"][2] and compose["services"]["export"]["entrypoint"][-1] == "export"
    export_dir = export["command"][3]  # "$0" of the script: the export's folder, named by what it exports
    assert export_dir.startswith("/models/exports/pi0-2v-bf16-")
    parsed = export_args(["--repository", export_dir, *export["args"]])
    assert (parsed.preset, parsed.variant, parsed.checkpoint) == ("pi0", "gpu", "/models/ckpt")
    # the spec those commands read is where the image puts it
    spec_path = Path(parsed.spec)
    dockerfile = (ROOT / "deploy" / "triton" / "Dockerfile").read_text()
    assert (
        "WORKDIR /opt/vlaserve" in dockerfile
        and "COPY model_repository/spec.yaml ./model_repository/spec.yaml" in dockerfile
    )
    assert spec_path == Path("/opt/vlaserve/model_repository/spec.yaml")
    assert "!model_repository/spec.yaml" in (ROOT / ".dockerignore").read_text()  # in the build context
    # the configs init container, run for real on an export here: /models, /serve and the image's spec mapped
    shutil.copytree(tiny_repo, tmp_path / export_dir.lstrip("/"), symlinks=True)
    configs = next(c for c in pods if c["name"] == "configs")
    assert configs["args"][1] == export_dir
    local = {"/models": str(tmp_path / "models"), "/serve": str(tmp_path / "serve"),
             str(spec_path): str(ROOT / "model_repository" / "spec.yaml")}  # fmt: skip

    def mapped(arg: str) -> str:
        for inside, here in local.items():
            arg = arg.replace(inside, here) if arg.startswith(inside) else arg
        return arg

    assert repository.main([mapped(a) for a in configs["args"]]) == 0
    served = repository.read_config(tmp_path / "serve" / "repository" / "policy" / "config.pbtxt")
    assert served.backend == "python" and [list(g.gpus) for g in served.instance_group] == [[0, 1]]  # its 2 GPUs


def test_the_hpa_scales_on_the_adapters_metric_from_series_triton_exports(tmp_path, server):
    from vlaserve.client import PolicyClient
    from vlaserve.model.parity import random_request

    kinds = by_kind(render(tmp_path))
    metric = kinds["HorizontalPodAutoscaler"][0]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = yaml.safe_load(kinds["ConfigMap"][0]["data"]["config.yaml"])["rules"]
    assert [r["name"]["as"] for r in rules] == [metric]
    query = rules[0]["metricsQuery"]
    request = {k: v.numpy() for k, v in random_request(1, 2, 1024, 0).items()}
    PolicyClient(server.grpc_url).infer(request)
    exported = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    for series in ("nv_inference_queue_duration_us", "nv_inference_request_success"):
        assert series in query and f'{series}{{model="{io.POLICY}"' in exported, series


def test_mps_sharing_renders_the_device_plugins_config(tmp_path):
    assert "ConfigMap" not in {o["kind"] for o in render(tmp_path) if o["metadata"]["name"].endswith("device-plugin")}
    shared = [
        o
        for o in render(tmp_path, {"gpuSharing": {"mpsReplicas": 4}})
        if o["metadata"]["name"] == "vlaserve-device-plugin"
    ]
    assert shared[0]["metadata"]["namespace"] == "gpu-operator"
    config = yaml.safe_load(shared[0]["data"]["vlaserve-mps"])
    assert config["sharing"]["mps"]["resources"] == [{"name": "nvidia.com/gpu", "replicas": 4}]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"modelRepository": {"source": "s3"}}, 'modelRepository.source: got "s3", expected export or pvc'),
        ({"modelRepository": {"source": "pvc"}}, "modelRepository.source pvc needs persistence.existingClaim"),
    ],
)
def test_bad_values_fail_the_render_with_a_reason(tmp_path, values, message):
    done = run_helm("template", "rel", str(CHART), values=values, tmp=tmp_path)
    assert done.returncode != 0 and message in done.stderr


def test_a_repository_on_an_existing_claim_is_served_without_an_export(tmp_path):
    values = {"modelRepository": {"source": "pvc"}, "persistence": {"existingClaim": "trained-pi0"}}
    objects = render(tmp_path, values)
    triton = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("triton"))
    assert list(containers(triton)) == ["configs", "triton"]
    volume = triton["spec"]["template"]["spec"]["volumes"][0]
    assert volume["persistentVolumeClaim"]["claimName"] == "trained-pi0"
    assert "PersistentVolumeClaim" not in {o["kind"] for o in objects}


def test_other_values_export_into_another_folder(tmp_path):
    def export_dir(values):
        triton = next(o for o in render(tmp_path, values) if o["metadata"]["name"].endswith("-triton")
                      and o["kind"] == "Deployment")  # fmt: skip
        return containers(triton)["export"]["command"][3]

    first = export_dir(None)
    assert export_dir({"model": {"checkpoint": "/models/mine"}}) != first  # a claim's old export is not reused
    assert export_dir({"model": {"dtype": "fp16"}}) != first
    assert export_dir({"modelRepository": {"exportDir": "my-export"}}) == "/models/my-export"


def test_mps_sharing_with_several_gpus_per_pod_is_refused(tmp_path):
    done = run_helm("template", "rel", str(CHART), values={"gpuSharing": {"mpsReplicas": 2}, "triton": {"gpusPerPod": 2}},
                    tmp=tmp_path)  # fmt: skip
    assert done.returncode != 0 and "gpuSharing.mpsReplicas with triton.gpusPerPod > 1" in done.stderr


def test_the_install_notes_warn_of_random_weights():
    # helm template does not render NOTES.txt and helm install needs a cluster: the template itself is read
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    assert "{{- if not .Values.model.checkpoint }}" in notes and "RANDOM weights" in notes
