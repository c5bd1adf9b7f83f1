"""The Triton Python-backend runner that serves both the encoder and the decoder.

Each model instance is its own stub process, so each can have its own MPS thread percentage:
:func:`apply_mps_limits` sets it in ``initialize()`` before anything creates a CUDA context (a limit
set later is ignored). The runner reads its model's ``manifest.json`` (written by ``make export``),
screens the model's matrix products on its device and share, loads the artifact with the runtime the
config names, and runs the export's golden samples through the serving path before it reports ready
(:mod:`vlaserve.value_check`). In ``execute()`` it checks every request on its own: a bad request gets
an error response naming the tensor, and the rest of the batch is served.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from vlaserve import admission, drain, validation, value_check
from vlaserve import interface as io
from vlaserve.errors import VlaserveError
from vlaserve.files import write_whole
from vlaserve.manifest import Manifest
from vlaserve.params import GroupLimits, RunnerParams
from vlaserve.runtimes import load_runtime

try:  # provided by the Python backend's stub process
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (unit tests, docs)
    pb_utils = None

STATUS_DIR_ENV = "VLASERVE_STATUS_DIR"  # where each instance writes <instance>.json (see vlaserve.status)
# A counter on Triton's /metrics page: requests this model ran its artifact on. Triton's own success
# count is no measure of compute here: the Python backend counts an error answer as a success.
COMPUTED_METRIC = "vlaserve_computed_requests"
# Where an instance's execute spends its time, summed over its executes (ms): reading and checking the
# requests' inputs; waiting for admission (a pipeline's first model), then batching, padding and queuing every
# step's work (on a CPU instance: computing it); counting them on Triton's metrics and copying the outputs to
# the host (on a GPU: waiting for its work); building the responses. Kept in <status dir>/<instance>.executes, float64 [executes, ms of each
# phase], updated in place after each execute that computed (memory writes to a mapped file); read by
# read_executes. A batch refused or failed is not counted.
PHASES = ("read", "launch", "wait", "answer")
EXECUTES_SUFFIX = ".executes"


LOCK_DIR_ENV = "VLASERVE_LOCK_DIR"  # where the per-GPU start locks live (default: the temp dir)
LOCK_TIMEOUT_S = 900.0  # waited this long for the start lock, an instance starts without it and says so


@contextlib.contextmanager
def gpu_start_lock(key: str, directory: str | None = None, timeout: float = LOCK_TIMEOUT_S, log=None):
    """Held while an instance sets up on a GPU (``key``): creates its CUDA context, screens its products, loads,
    compiles, captures and checks its models; so that one instance per GPU does at a time, among the processes
    that share the lock's directory. Triton loads models and instances in parallel, and an instance that times
    its graph choices while another works on the same GPU measures that contention, not its choices: two pi0
    instances starting together on the H200 each kept, at bucket 14, a decoder graph 1.2-1.3x slower alone than
    the fastest (docs/BENCHMARKS.md). Yields what the instance's status records: {"gpu_start_waited_s": seconds}
    once held, or {"gpu_start_lock": why not} when the lock file cannot be opened or another instance held it
    past ``timeout`` (the instance then sets up without it). ``log`` gets a line every 30 s of waiting. An flock:
    a process that dies frees it."""
    folder = Path(directory or os.environ.get(LOCK_DIR_ENV) or tempfile.gettempdir())
    path = folder / f"vlaserve-gpu-start-{key}.lock"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:
        try:  # made by another user's server: flock needs only a file open for reading
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            yield {"gpu_start_lock": f"unavailable ({type(exc).__name__}: {exc}); set up without it"}
            return
    started = time.monotonic()
    next_log = 30.0
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                if waited >= timeout:
                    yield {"gpu_start_lock": f"{path} still held after {timeout:g} s; set up without it"}
                    return
                if log is not None and waited >= next_log:
                    log(f"waiting {waited:.0f} s for {path}: another instance is setting up on this GPU")
                    next_log += 30.0
                time.sleep(0.1)
        try:
            yield {"gpu_start_waited_s": round(time.monotonic() - started, 2)}
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def gpu_key(device: str) -> str | None:
    """What names ``device``'s GPU for :func:`gpu_start_lock` across processes (its UUID; else its index, which
    only processes with the same visible devices share); None off a GPU or where this torch has no CUDA."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.device(device))
    uuid = getattr(props, "uuid", None)
    return "".join(c for c in str(uuid) if c.isalnum() or c == "-") if uuid else f"index{torch.device(device).index}"


def read_executes(path: Path) -> dict:
    """An instance's executes file: {"count": executes, "<phase>_ms": summed ms of each of PHASES}."""
    values = np.fromfile(path, dtype=np.float64, count=1 + len(PHASES))
    return {"count": int(values[0]), **{f"{phase}_ms": float(v) for phase, v in zip(PHASES, values[1:])}}


def instance_group_of(instance_name: str, group_names) -> str | None:
    """Triton names instances ``<group>_<index>``: the group an instance belongs to."""
    matches = [g for g in group_names if instance_name.startswith(f"{g}_")]
    return max(matches, key=len) if matches else None


def expected_sm_count(percentage: int, total_sms: int) -> int:
    """SMs MPS gives for a thread percentage: rounded down to whole TPCs (pairs of SMs), as measured."""
    return max(2, 2 * int(percentage * total_sms / 200))


def _major_minor(version: str) -> tuple[int, int] | None:
    parts = version.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit() else None


def check_torch_version(instance: str, exported_with: str, running: str) -> None:
    """Refuse a TorchScript artifact written by a newer torch than the one serving it: an older torch may
    fail to load it, or load it and run it differently. The same or a newer torch is accepted."""
    exported, here = _major_minor(exported_with), _major_minor(running)
    if exported and here and here < exported:
        raise VlaserveError(
            f"{instance}: torch",
            f"{running} here, the artifact was exported with {exported_with}",
            f"torch {exported[0]}.{exported[1]} or newer where it is served, or an export with the serving torch "
            "(in the compose stack: docker compose run --rm export)",
        )


def gpu_sm_total(listed: str, device_id: int) -> int | None:
    """The full SM count of GPU ``device_id`` from $VLASERVE_GPU_SMS (the launcher's "132,132,...", one per
    GPU it sees, read before MPS limited anything); None where it does not say."""
    counts = [c.strip() for c in listed.split(",")]
    if device_id < len(counts) and counts[device_id].isdigit():
        return int(counts[device_id])
    return None


def apply_mps_limits(limits: GroupLimits, instance: str, device_id: int | None = None) -> dict:
    """Put this instance's MPS limits into the environment; must run before the first CUDA call. The pinned
    memory limit is MPS's per device: it is set for the GPU the instance runs on (``device_id``)."""
    applied = {}
    value = limits.mps_thread_percentage
    if value is not None:
        if not 1 <= value <= 100:
            raise VlaserveError(f"{instance}: mps_thread_percentage", value, "an integer in 1..100")
        os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(value)
        applied["mps_thread_percentage"] = value
    pinned = limits.mps_pinned_memory_limit_mb
    if pinned is not None:
        os.environ["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"{device_id or 0}={pinned}M"
        applied["mps_pinned_memory_limit_mb"] = pinned
    return applied


@dataclasses.dataclass
class Stage:
    """One step of the pipeline as an instance runs it: its artifacts, parameters, manifest and runtime. An
    ensemble's model runs one; the policy run as one model (spec pipeline one_model) runs every step, each
    from the subfolder of its name, the outputs of one handed to the next where they are (on the GPU)."""

    name: str
    version_dir: Path
    params: RunnerParams
    manifest: Manifest
    status: dict
    runtime: object = None


class TritonPythonModel:
    """One instance of the encoder or the decoder, or of the policy run as one model."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        params = RunnerParams.from_config(
            {k: v["string_value"] for k, v in config.get("parameters", {}).items()}, f"{self.model_name} parameters"
        )
        self.instance = args["model_instance_name"]
        group = instance_group_of(self.instance, [g["name"] for g in config.get("instance_group", [])])
        self.status = {"model": self.model_name, "instance": self.instance, "group": group, "pid": os.getpid()}
        on_gpu = args["model_instance_kind"] == "GPU"
        device_id = int(args["model_instance_device_id"]) if on_gpu else None
        # before any CUDA context
        self.status.update(apply_mps_limits(params.limits(group), self.instance, device_id))

        version_dir = Path(args["model_repository"]) / str(args["model_version"])
        self.stages = self._stages(version_dir, params)
        first = self.stages[0]
        self.manifest = first.manifest
        # The request inputs: every step input no earlier step gives (one step: the artifact's inputs).
        self.input_shapes, produced = {}, set()
        for stage in self.stages:
            self.input_shapes.update(
                {k: list(v.shape[1:]) for k, v in stage.manifest.inputs.items() if k not in produced}
            )
            produced.update(stage.manifest.outputs)
        # Request inputs the config gives this model besides the artifact's own: checked here, not computed on
        # (the encoder checks the decoder's state and noise, so that no compute is spent on a request the
        # decoder would reject).
        self.check_only = {i["name"]: i["dims"] for i in config["input"] if i["name"] not in self.input_shapes}
        self.output_names = list(self.stages[-1].manifest.outputs)
        device = f"cuda:{device_id}" if on_gpu else "cpu"
        for stage in self.stages:
            runtime_name = stage.params.runtime
            if runtime_name == "torchscript":
                import torch

                check_torch_version(self.instance, stage.manifest.torch, torch.__version__)
            traced_on = stage.manifest.init_device
            if runtime_name == "torchscript" and traced_on != device.split(":")[0]:
                raise VlaserveError(
                    f"{self.instance}: instance kind",
                    args["model_instance_kind"],
                    f"{traced_on.upper()}: the TorchScript artifact was traced on {traced_on} (export with --device "
                    "to match)",
                )
        # Batches are padded up to the next bucket so that only warmed-up shapes ever run (a new shape
        # makes TorchScript's profiling executor re-optimize, seconds for pi0, while requests queue),
        # and, with cuda_graphs, only shapes that have a captured graph.
        self.buckets = sorted(first.params.batch_buckets)
        self.value_check = first.params.value_check or "refuse"
        if self.value_check not in value_check.VALUE_CHECK_MODES:
            raise VlaserveError(
                f"{self.instance}: value_check", self.value_check, f"one of {value_check.VALUE_CHECK_MODES}"
            )
        checked_batches = self.buckets or sorted({1, int(config.get("max_batch_size") or 1)})
        key = gpu_key(device) if on_gpu else None  # one instance sets up on a GPU at a time
        with gpu_start_lock(key, log=self._log_info) if key else contextlib.nullcontext({}) as lock_status:
            self.status.update(lock_status)
            if on_gpu:
                self.status.update(self._gpu_status(device))  # creates the CUDA context, under the MPS limit
                if "sm_count" not in self.status:
                    device = "cpu"  # this torch has no CUDA: the runtime falls back to the CPU as well
            if self.value_check != "off":  # before the models load: a bad share is refused in seconds
                status_dir = os.environ.get(STATUS_DIR_ENV)
                cache = Path(status_dir).parent / value_check.PRODUCTS_CACHE if status_dir else None
                for stage in self.stages:
                    products = value_check.cached_products(stage.manifest, checked_batches, cache)
                    screened = value_check.screen_products(products, stage.manifest.dtype, device)
                    self._judge("products", screened, stage)
            self._load_stages(device, checked_batches)
        self.runtime = first.runtime  # how inputs are read and where outputs are: the steps share it
        self.status.update(runtime=first.params.runtime, device=self.runtime.device, kind=args["model_instance_kind"])
        self.pinned: dict[int, object] = {}  # page-locked host buffers for the outputs (_to_host)
        self.staging: dict[str, object] = {}  # host buffers for the batched inputs (_stage)
        self.status.setdefault("value_check", "off" if self.value_check == "off" else "pass")
        noise_seed = next((st.params.noise_seed for st in self.stages if io.NOISE in st.manifest.inputs), None)
        seed = (noise_seed or 0) + int(args["model_instance_device_id"]) * 1000
        self.rng = np.random.default_rng([seed, sum(map(ord, self.instance))])
        self.admission, self.admission_role = None, params.admission_role
        status_dir = os.environ.get(STATUS_DIR_ENV)
        if self.admission_role and status_dir:  # the pipeline's in-flight limit (vlaserve.admission)
            self.admission = admission.Admission(
                Path(status_dir) / admission.ADMISSION_FILE,
                params.admission_limit,
                params.admission_ttl_s,
            )
            self.admission_wait_s = params.admission_wait_s if params.admission_wait_s is not None else 5.0
        # Stopping (vlaserve.drain): this instance's busy mark, and whether it refuses new work once the
        # launcher closes the door: the models clients call do; the decoder finishes what got past them.
        self.door = drain.Door(status_dir, self.instance)
        self.refuses_on_close = drain.refuses_new_work(self.model_name)
        self.computed = None
        if pb_utils is not None:  # the family is kept: its metric dies with it
            self.computed_family = family = pb_utils.MetricFamily(
                name=COMPUTED_METRIC,
                description="Requests a vlaserve model ran its artifact on (a request refused before compute is none)",
                kind=pb_utils.MetricFamily.COUNTER,
            )
            self.computed = family.Metric(labels={"model": self.model_name, "instance": self.instance})
        self.executes = (
            drain.mapped_array(Path(status_dir) / f"{self.instance}{EXECUTES_SUFFIX}", [0.0] * (1 + len(PHASES)))
            if status_dir
            else None
        )
        self._write_status()

    def _stages(self, version_dir: Path, params: RunnerParams) -> list[Stage]:
        """The steps this model runs: its own artifact, or (params.steps) each step's from its subfolder. One
        step's status is the instance's; several each have theirs under "steps"."""
        if params.steps:
            known = [step.model for step in io.PIPELINE]
            unknown = sorted(set(params.steps) - set(known))
            if unknown:
                raise VlaserveError(f"{self.model_name} parameters: {unknown[0]}/", "a step", f"one of {known}")
            where = [(name, version_dir / name, params.steps[name]) for name in known if name in params.steps]
            self.status["steps"] = {name: {} for name, _, _ in where}
        else:
            where = [(self.model_name, version_dir, params)]
        stages = []
        for name, folder, step_params in where:
            manifest_path = folder / io.MANIFEST_FILE
            if not manifest_path.is_file():
                raise VlaserveError(f"{name} manifest", str(manifest_path), "a file written by `make export`")
            status = self.status["steps"][name] if params.steps else self.status
            stages.append(Stage(name, folder, step_params, Manifest.read(manifest_path), status))
        return stages

    # ---- value checks -----------------------------------------------------------------------------
    @staticmethod
    def _run_synced(runtime, inputs: dict) -> list:
        outputs = runtime.run(inputs)
        if runtime.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize(runtime.device)
        return outputs

    def _share(self) -> str:
        """The device and share this instance runs on, in words."""
        if "sm_count" not in self.status:
            return "the CPU"
        limit = self.status.get("mps_thread_percentage")
        limit = f"mps_thread_percentage {limit}" if limit is not None else "no MPS thread limit"
        return f"{self.status['gpu']}, {limit} ({self.status['sm_count']} SMs)"

    def _judge(self, check: str, result: dict, stage: Stage) -> None:
        """Record a check's result; on a failure refuse to load (value_check: refuse) or warn (warn)."""
        stage.status[f"{check}_check"] = result
        if value_check.passed(result):
            return
        safe = value_check.safe_percentages(self.status.get("gpu", ""), stage.manifest.settings)
        label = {"products": f"{stage.manifest.dtype} matrix products", "golden": "golden-sample outputs"}[check]
        if len(self.stages) > 1:
            label = f"the {stage.name}'s {label}"
        line = value_check.refusal_line(self.instance, self._share(), label, result, "sm_count" in self.status, safe)
        if self.value_check == "warn":
            self.status["value_check"] = f"FAILED {check}, serving anyway (warn)"
            self._log_warn(line + " (value_check: warn, so serving anyway)")
            return
        self.status["value_check"] = f"FAILED {check}, refused"
        self._write_status()
        if pb_utils is not None:
            pb_utils.Logger.log_error(line)
        raise value_check.ValueCheckError(line + " (value_check: refuse)")

    # ---- status -----------------------------------------------------------------------------------
    def _gpu_status(self, device: str) -> dict:
        import torch

        if not torch.cuda.is_available():
            return {}
        torch.cuda.set_device(device)
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        status = {"gpu": props.name, "sm_count": props.multi_processor_count,
                  "probe_tflops": value_check.matmul_tflops(torch, device)}  # fmt: skip
        pct = self.status.get("mps_thread_percentage")
        total = gpu_sm_total(os.environ.get("VLASERVE_GPU_SMS", ""), int(device.split(":")[1]))
        if pct is not None and total:
            status["expected_sm_count"] = expected_sm_count(pct, int(total))
            if abs(status["expected_sm_count"] - props.multi_processor_count) > 2:
                self._log_warn(
                    f"{self.instance}: mps_thread_percentage {pct} gave {props.multi_processor_count} SMs, "
                    f"expected {status['expected_sm_count']} of {total}: is the MPS daemon running, and was "
                    "the CUDA context created before the limit was set?"
                )
        elif pct is not None:
            self._log_warn(
                f"{self.instance}: mps_thread_percentage {pct} set, {props.multi_processor_count} SMs visible, but "
                "the GPU's full SM count is unknown here: start the server with --mps (make serve MPS=1) to check it"
            )
        return status

    def _compile(self, stage: Stage) -> dict:
        """The traced model as Python with Inductor-compiled layers, checked against the artifact at the
        smallest bucket (vlaserve.runtimes.TorchScriptRuntime.compile); otherwise a warning, and the
        TorchScript module serves."""
        import time

        started = time.perf_counter()
        runtime = stage.runtime
        if not hasattr(runtime, "compile"):
            why_not = f"the {stage.params.runtime} runtime has no compiled path: running it as it is"
        else:
            why_not = runtime.compile(stage.manifest, batch=self.buckets[0] if self.buckets else 1)
        if why_not:
            self._log_warn(f"{self.instance}: {stage.name}: compile requested, {why_not}")
            return {"compiled": False, "compile_note": why_not}
        return {
            "compiled": True,
            "compile_s": round(time.perf_counter() - started, 2),
            "compiled_rel": runtime.compiled_rel,
            **({"precision": runtime.precision} if getattr(runtime, "precision", None) else {}),
            **({"precision_note": runtime.precision_note} if getattr(runtime, "precision_note", "") else {}),
            **({"fused_note": runtime.fused_note} if getattr(runtime, "fused_note", "") else {}),
        }

    def _load_stages(self, device: str, checked_batches: list[int]) -> None:
        """Each step's runtime loaded on ``device``, compiled, its graphs captured and its golden samples checked
        through the serving path, as its parameters say."""
        for stage in self.stages:
            stage.runtime = load_runtime(
                stage.params.runtime, stage.version_dir, list(stage.manifest.outputs), device,
                stage.params.cpu_threads or 0,
            )  # fmt: skip
            stage.status.update(runtime=stage.params.runtime, device=stage.runtime.device)
            stage.runtime.fused_kernels = stage.params.fused_kernels  # a graph choice of the compiled model
            stage.runtime.precision = stage.params.precision  # fp8 products in the compiled model
            if stage.params.compile:
                stage.status.update(self._compile(stage))
            if stage.params.cuda_graphs:
                stage.status.update(self._capture_graphs(stage))
            if self.value_check != "off":  # through the exact serving path: compiled layers, graphs, attention
                from vlaserve.model.parity import judged_as  # imports torch, as the golden check does

                golden = value_check.load_golden(stage.version_dir)
                as_numpy = stage.runtime.tensor_kind == "numpy"
                run = functools.partial(self._run_synced, stage.runtime)
                dtype = judged_as(stage.manifest.dtype, getattr(stage.runtime, "precision", None))
                result = value_check.check_golden(run, golden, checked_batches, dtype, as_numpy)
                self._judge("golden", result, stage)

    def _capture_graphs(self, stage: Stage) -> dict:
        """One CUDA graph per bucket, captured before the model reports ready (Triton's warm-up then
        replays them); on a CPU instance a warning, and the module runs as it is."""
        started = time.perf_counter()
        why_not = stage.runtime.capture_graphs(self.buckets, stage.manifest.inputs)
        if why_not:
            self._log_warn(f"{self.instance}: {stage.name}: cuda_graphs requested, {why_not}")
            return {"cuda_graphs": [], "cuda_graphs_note": why_not}
        graphs = stage.runtime.graphs
        return {
            "cuda_graphs": self.buckets,
            "capture_s": round(time.perf_counter() - started, 2),
            "attention": {str(b): graphs.chosen[b] for b in self.buckets},
            "replay_ms": {str(b): graphs.timings[b] for b in self.buckets},
            **({"capture_failed": {str(b): f for b, f in graphs.failed.items()}} if graphs.failed else {}),
        }

    def _write_status(self) -> None:
        message = ", ".join(f"{k}={v}" for k, v in self.status.items())
        if pb_utils is not None:
            pb_utils.Logger.log_info(f"vlaserve instance ready: {message}")
        status_dir = os.environ.get(STATUS_DIR_ENV)
        if status_dir:
            Path(status_dir).mkdir(parents=True, exist_ok=True)
            write_whole(Path(status_dir) / f"{self.instance}.json", json.dumps(self.status) + "\n")

    def _account(self, marks: list[float]) -> None:
        """Add one execute's phases (``marks``: its start, then the end of each of PHASES) to its file: the
        sums first, then the count, so that a reader during an execute sees them ahead of the count, not
        behind it."""
        if self.executes is not None and len(marks) == 1 + len(PHASES):
            self.executes[1:] += np.diff(marks) * 1e3
            self.executes[0] += 1

    @staticmethod
    def _log_warn(message: str) -> None:
        if pb_utils is not None:
            pb_utils.Logger.log_warn(message)

    @staticmethod
    def _log_info(message: str) -> None:
        if pb_utils is not None:
            pb_utils.Logger.log_info(message)

    # ---- requests --------------------------------------------------------------------------------
    def _read(self, request, name: str, as_numpy: bool):
        """An input tensor of a request: numpy (host), or torch (host or device, through DLPack)."""
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None
        if as_numpy and tensor.is_cpu():
            return tensor.as_numpy()
        import torch

        data = torch.from_dlpack(tensor.to_dlpack())
        return data.cpu().numpy() if as_numpy else data

    def _request_inputs(self, request) -> dict:
        """Read and check one request's inputs (a VlaserveError names what is wrong)."""
        as_numpy = self.runtime.tensor_kind == "numpy"
        required = [n for n in (*self.input_shapes, *self.check_only) if n != io.NOISE]
        inputs = {}
        for name in self.input_shapes:
            checked = name in io.REQUEST_INPUTS  # request-facing: on the host, small
            value = self._read(request, name, as_numpy or checked)
            if value is None and name == io.NOISE:
                batch = len(inputs[io.STATE])
                value = self.rng.standard_normal((batch, *self.input_shapes[io.NOISE]), dtype=np.float32)
            elif value is None:
                raise VlaserveError(name, "no such input", f"every input of {required} (noise may be left out)")
            validation.check_batch(name, value, self.input_shapes[name])
            if name == io.TOKENS:
                validation.check_tokens(value, self.manifest.vocab_size, self.manifest.prompt_tokens)
            elif name in (io.STATE, io.NOISE):
                validation.check_finite(name, value)
            inputs[name] = value
        batch = len(next(iter(inputs.values())))
        for name, shape in self.check_only.items():
            value = self._read(request, name, as_numpy=True)
            if value is None and name != io.NOISE:
                raise VlaserveError(name, "no such input", f"every input of {required} (noise may be left out)")
            if value is not None:
                validation.check_batch(name, value, shape)
                if len(value) != batch:
                    raise VlaserveError(name, f"batch {len(value)}", f"the batch of the other inputs ({batch})")
                validation.check_finite(name, value)
        if not as_numpy:
            import torch

            inputs = {
                k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v
                for k, v in inputs.items()
            }
        return inputs

    def _concat(self, parts: list[dict]) -> dict:
        if len(parts) == 1:
            return parts[0]
        if self.runtime.tensor_kind == "numpy":
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        import torch

        return {k: torch.cat([p[k].to(self.runtime.device) for p in parts]) for k in parts[0]}

    def _batch(self, parts: list[dict], size: int) -> dict:
        """The accepted requests' inputs as one batch, padded to the smallest bucket that holds ``size``.
        For a torch runtime, a request-facing input (images, tokens, state, noise: at most 0.3 MB an item)
        whose parts are all on the host is written once into this instance's staging buffer for it, last item
        repeated into the padding rows (:meth:`_stage`). Any other input (an earlier model's output, such as
        the 10 MB of prefix keys/values an item, whose staging was not measured) is joined and padded on the
        runtime's device as before. One request that fills its bucket goes as it came: there is nothing to
        join, and staging it appeared slower at batch 1 (docs/BENCHMARKS.md)."""
        target = next((b for b in self.buckets if b >= size), size)
        if self.runtime.tensor_kind == "numpy" or (len(parts) == 1 and target == size):
            return self._pad(self._concat(parts), size)
        batch = {}
        for name in parts[0]:
            values = [p[name] for p in parts]
            if name in io.REQUEST_INPUTS and all(v.device.type == "cpu" for v in values):
                batch[name] = self._stage(name, values, target)
            else:
                batch.update(self._pad(self._concat([{name: v} for v in values]), size))
        return batch

    def _stage(self, name: str, values: list, target: int):
        """``values`` (host tensors, batch first) copied into the staging buffer for ``name``, rows past them
        filled with the last one, up to ``target`` rows: a view of the buffer. The buffer is kept and grown
        as needed, page-locked where the runtime is on a GPU: the copy to the GPU is then one transfer at
        the bus's speed that runs while the host goes on, where from each request's own memory it was one
        slower, blocking copy per request. Reusing it in the next call is safe: a call that computed waits
        for its outputs to reach the host (:meth:`_answer`), and so for its inputs' transfer, which the same
        stream ran first."""
        import torch

        first = values[0]
        shape = (target, *first.shape[1:])
        numel = math.prod(shape)
        buffer = self.staging.get(name)
        if buffer is None or buffer.dtype != first.dtype or buffer.numel() < numel:
            pin = str(self.runtime.device).startswith("cuda")
            buffer = self.staging[name] = torch.empty(numel, dtype=first.dtype, pin_memory=pin)
        view = buffer[:numel].view(shape)
        size = sum(len(v) for v in values)
        torch.cat(values, out=view[:size])
        if target > size:
            view[size:] = view[size - 1 : size]
        return view

    def _pad(self, inputs: dict, size: int) -> dict:
        """Repeat the last item up to the smallest bucket that holds ``size`` (outputs are sliced back)."""
        target = next((b for b in self.buckets if b >= size), size)
        if target == size:
            return inputs
        if self.runtime.tensor_kind == "numpy":
            return {k: np.concatenate([v, np.repeat(v[-1:], target - size, axis=0)]) for k, v in inputs.items()}
        import torch

        return {k: torch.cat([v, v[-1:].expand(target - size, *v.shape[1:])]) for k, v in inputs.items()}

    def _output_tensor(self, name: str, value):
        if isinstance(value, np.ndarray):
            return pb_utils.Tensor(name, np.ascontiguousarray(value))
        from torch.utils.dlpack import to_dlpack

        return pb_utils.Tensor.from_dlpack(name, to_dlpack(value.contiguous()))

    def execute(self, requests):
        self.door.enter()  # before looking at the door: a batch past it is visible to the launcher
        try:
            if self.refuses_on_close and self.door.closing():
                return self._refuse(requests, f"{self.model_name}: {drain.STOPPING_MESSAGE}")
            if self.admission is not None and self.admission_role == "release":
                try:
                    return self._execute(requests)
                finally:  # every request answered, right or wrong, frees its slot
                    self.admission.release(len(requests))
            return self._execute(requests)
        finally:
            self.door.leave()

    @staticmethod
    def _refuse(requests, message: str) -> list:
        """UNAVAILABLE (retryable) for each request, computing nothing."""
        return [
            pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.UNAVAILABLE))
            for _ in requests
        ]

    def _execute(self, requests):
        marks = [time.perf_counter()]
        responses = [None] * len(requests)
        accepted, parts = [], []
        for i, request in enumerate(requests):
            try:
                parts.append(self._request_inputs(request))
                accepted.append(i)
            except VlaserveError as exc:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{self.model_name}: {exc}", pb_utils.TritonError.INVALID_ARG)
                )
        if not parts:
            return responses
        marks.append(time.perf_counter())
        admitting = self.admission is not None and self.admission_role == "acquire"
        if admitting and not self.admission.acquire(len(accepted), self.admission_wait_s, give_up=self.door.closing):
            message = (
                f"{self.model_name}: {drain.STOPPING_MESSAGE}"
                if self.door.closing()
                else f"{self.model_name}: the pipeline is full ({self.admission.limit} requests between encoder "
                f"and decoder for {self.admission_wait_s:g} s, models.policy.max_in_flight); retry later"
            )
            for i, response in zip(accepted, self._refuse(accepted, message), strict=True):
                responses[i] = response
            return responses
        sizes = [len(next(iter(p.values()))) for p in parts]
        try:
            outputs = self._compute(self._batch(parts, sum(sizes)))
            marks.append(time.perf_counter())
        except Exception as exc:  # noqa: BLE001 - the runtime's failure goes back to each request it concerned
            if admitting:  # these requests never reach the decoder
                self.admission.release(len(accepted))
            for i in accepted:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{self.model_name}: the {self.status['runtime']} runtime failed: {exc}")
                )
            return responses
        if self.computed is not None:
            self.computed.increment(len(accepted))
        try:
            self._answer(responses, accepted, sizes, outputs, marks)
        except Exception as exc:  # noqa: BLE001 - the outputs could not be handed back: none reaches the decoder
            if admitting:
                self.admission.release(len(accepted))
            for i in accepted:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{self.model_name}: handing the outputs back failed: {exc}")
                )
            return responses
        marks.append(time.perf_counter())
        self._account(marks)
        return responses

    def _answer(self, responses: list, accepted: list[int], sizes: list[int], outputs: list, marks: list) -> None:
        """The responses of the accepted requests, from the batch's outputs (on the host); the time the outputs
        reached the host appended to ``marks``."""
        if self.runtime.device.startswith("cuda"):
            # Outputs leave on the host. Handed over on the GPU (DLPack, then the Python backend's CUDA IPC),
            # answers came back wrong under concurrent load: on the H200 with pi0, 3,507 of 5,909 answers at
            # 16 clients (relative error 0.58 to 0.68, the same request each time), with the producing stream
            # synchronized first and the tensors kept alive for 8 more batches; on the host, none of 2,699
            # (docs/BENCHMARKS.md). The copy to the host waits for the stream's work.
            # VLASERVE_DEVICE_HANDOFF=1 hands over on the device, only to reproduce that;
            # VLASERVE_PAGEABLE_HANDOFF=1 copies to ordinary memory, only to compare with the page-locked copy.
            if os.environ.get("VLASERVE_DEVICE_HANDOFF") == "1":
                import torch

                torch.cuda.current_stream(self.runtime.device).synchronize()
            elif os.environ.get("VLASERVE_PAGEABLE_HANDOFF") == "1":  # the copy before pinned buffers, to compare
                outputs = [o.cpu() for o in outputs]
            else:
                outputs = self._to_host(outputs)
        marks.append(time.perf_counter())
        offset = 0
        for i, size in zip(accepted, sizes):
            tensors = [
                self._output_tensor(n, out[offset : offset + size]) for n, out in zip(self.output_names, outputs)
            ]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            offset += size

    def _compute(self, inputs: dict) -> list:
        """Every step in order, each given its inputs from the request or an earlier step's outputs (kept
        where they were computed); the last step's outputs."""
        values = dict(inputs)
        for stage in self.stages:
            outputs = stage.runtime.run({name: values[name] for name in stage.manifest.inputs})
            values.update(zip(stage.manifest.outputs, outputs))
        return [values[name] for name in self.output_names]

    def _to_host(self, outputs: list) -> list:
        """The outputs copied into page-locked host buffers (kept per output and grown as needed: a copy from
        the GPU into them runs at the bus's speed, into ordinary memory at a fraction of it). Reusing them in
        the next call is safe: the stub copies every host output into its shared memory when this call's
        responses are sent, before it calls the model again."""
        import torch

        host = []
        for i, out in enumerate(outputs):
            buffer = self.pinned.get(i)
            if buffer is None or buffer.dtype != out.dtype or buffer.numel() < out.numel():
                buffer = self.pinned[i] = torch.empty(out.numel(), dtype=out.dtype, pin_memory=True)
            view = buffer[: out.numel()].view(out.shape)
            view.copy_(out, non_blocking=True)
            host.append(view)
        torch.cuda.current_stream(self.runtime.device).synchronize()
        return host

    def finalize(self) -> None:
        self.runtime = None
        for stage in self.stages:
            stage.runtime = None
