"""The two runtimes a runner model can execute its artifact with: ONNX Runtime and TorchScript (torch).

Each takes a dict of input tensors by name and returns the outputs in the manifest's order. ONNX
Runtime works on numpy arrays; TorchScript on torch tensors, on the CPU or a CUDA device.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlaserve.errors import VlaserveError

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.pt"


class OnnxRuntime:
    """An ONNX Runtime session; the CUDA provider on a GPU instance where onnxruntime has one."""

    tensor_kind = "numpy"

    def __init__(self, version_dir: Path, output_names, device: str = "cpu", threads: int = 0):
        import onnxruntime as ort

        path = Path(version_dir) / ONNX_FILE
        if not path.is_file():
            raise VlaserveError("runtime onnxruntime", str(path), "an exported model.onnx (run `make export`)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(device.partition(":")[2] or 0)}))
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.output_names = list(output_names)
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, inputs)


class TorchScriptRuntime:
    """A TorchScript module run under ``torch.inference_mode``; on a GPU, optionally from CUDA graphs."""

    tensor_kind = "torch"

    def __init__(self, version_dir: Path, output_names, device: str = "cpu", threads: int = 0):
        import torch

        path = Path(version_dir) / TORCHSCRIPT_FILE
        if not path.is_file():
            raise VlaserveError("runtime torchscript", str(path), "an exported model.pt (run `make export`)")
        if threads > 0:
            torch.set_num_threads(threads)
        if device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"
        self.torch = torch
        self.device = device
        self.module = torch.jit.load(str(path), map_location=device).eval()
        self.output_names = list(output_names)
        self.graphs: CudaGraphs | None = None

    def _call(self, *tensors) -> list:
        # Without the optimizing executor: it re-profiles and re-fuses every new input shape, which took
        # long enough for pi0 on the H200 that queued requests timed out (docs/BENCHMARKS.md).
        with self.torch.jit.optimized_execution(False):
            out = self.module(*tensors)
        return list(out) if isinstance(out, tuple) else [out]

    def capture_graphs(self, buckets, input_specs: dict) -> str:
        """Capture one CUDA graph per batch size in ``buckets``; returns why not, or "" when captured.

        ``input_specs`` is the manifest's {name: {dtype, shape}}; the graphs' static inputs are made from
        it. On a CPU instance (or without CUDA) nothing is captured and every call runs the module."""
        if not self.device.startswith("cuda"):
            return f"no CUDA device here ({self.device} instance): running without CUDA graphs"
        graphs = CudaGraphs(self.torch, self._call, self.device)
        try:
            with self.torch.inference_mode():
                for batch in sorted(buckets, reverse=True):  # the largest first: the smaller reuse its pool
                    graphs.capture(
                        [static_input(self.torch, spec, batch, self.device) for spec in input_specs.values()]
                    )
        except RuntimeError as exc:  # the module is still usable without graphs; the status says why
            self.torch.cuda.synchronize(self.device)
            return f"CUDA-graph capture failed at batch {batch}, running without graphs: {str(exc).splitlines()[0]}"
        self.graphs = graphs
        return ""

    def run(self, inputs: dict) -> list:
        tensors = list(inputs.values())
        with self.torch.inference_mode():
            if self.graphs is not None and self.graphs.has(len(tensors[0])):
                return self.graphs.replay(tensors)  # copies host inputs straight into the static ones
            return self._call(*(t.to(self.device, non_blocking=True) for t in tensors))


def static_input(torch, spec: dict, batch: int, device: str):
    """A valid input of ``spec`` (manifest dtype and per-item shape) at ``batch``: ones for masks and token
    ids (a valid token, an all-valid mask: no empty attention row), zeros for everything else."""
    dtype = getattr(torch, spec["dtype"])
    shape = (batch, *spec["shape"][1:])
    if dtype in (torch.bool, torch.int32, torch.int64):
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


# Attention kernels a graph may be captured with (torch.backends.cuda flags); the first is torch's own
# choice. For pi0's decoder (a few hundred queries, head_dim 256, an additive mask) torch's first choice,
# cuDNN, took 54 us per call on the H200 (docs/BENCHMARKS.md), so each bucket keeps the fastest.
SDPA_CHOICES = {
    "default": {},
    "efficient": {"cudnn": False, "flash": False, "math": False},
    "math": {"cudnn": False, "flash": False, "mem_efficient": False},
}


class CudaGraphs:
    """One captured CUDA graph per batch size over ``fn`` (tensors -> list of tensors), sharing one memory
    pool. Each batch size is captured once per attention-kernel choice (SDPA_CHOICES), and the fastest
    replay is kept. A call copies its inputs into the graph's static inputs, replays it, and returns
    copies of the static outputs (the next replay overwrites them)."""

    def __init__(self, torch, fn, device: str, choices=tuple(SDPA_CHOICES)):
        self.torch, self.fn, self.device, self.choices = torch, fn, device, choices
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple] = {}  # batch -> (graph, static inputs, static outputs)
        self.timings: dict[int, dict[str, float]] = {}  # batch -> {choice: replay ms}
        self.chosen: dict[int, str] = {}

    def has(self, batch: int) -> bool:
        return batch in self.graphs

    def _flags(self, choice: str) -> dict:
        backends = self.torch.backends.cuda
        getters = {"cudnn": backends.cudnn_sdp_enabled, "flash": backends.flash_sdp_enabled,
                   "mem_efficient": backends.mem_efficient_sdp_enabled, "math": backends.math_sdp_enabled}  # fmt: skip
        before = {name: get() for name, get in getters.items()}
        for name, on in {**{n: True for n in getters}, **SDPA_CHOICES[choice]}.items():
            getattr(backends, f"enable_{name}_sdp")(on)
        return before

    def _capture_one(self, static_inputs: list):
        torch = self.torch
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm up outside the capture (lazy inits, allocator, cuBLAS handles)
            for _ in range(2):
                self.fn(*static_inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_outputs = self.fn(*static_inputs)
        return graph, static_outputs

    def _replay_ms(self, graph, repeats: int = 3) -> float:
        start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / repeats

    def capture(self, static_inputs: list) -> None:
        batch = len(static_inputs[0])
        best = None
        for choice in self.choices:
            before = self._flags(choice)
            try:
                graph, outputs = self._capture_one(static_inputs)
            except RuntimeError:
                if choice == self.choices[0]:
                    raise  # torch's own choice must capture; the others may not apply to this model
                self.torch.cuda.synchronize(self.device)
                continue
            finally:
                self._flags_restore(before)
            ms = self._replay_ms(graph)
            self.timings.setdefault(batch, {})[choice] = round(ms, 3)
            if best is None or ms < best[0]:
                best = (ms, choice, graph, outputs)
        _, self.chosen[batch], graph, outputs = best
        self.graphs[batch] = (graph, static_inputs, outputs)

    def _flags_restore(self, before: dict) -> None:
        for name, on in before.items():
            getattr(self.torch.backends.cuda, f"enable_{name}_sdp")(on)

    def replay(self, tensors: list) -> list:
        graph, static_inputs, static_outputs = self.graphs[len(tensors[0])]
        for static, tensor in zip(static_inputs, tensors):
            static.copy_(tensor, non_blocking=True)
        graph.replay()
        return [out.clone() for out in static_outputs]


RUNTIMES = {"onnxruntime": OnnxRuntime, "torchscript": TorchScriptRuntime}


def load_runtime(name: str, version_dir: Path, output_names, device: str = "cpu", threads: int = 0):
    """The runtime called ``name`` over the artifacts in ``version_dir``."""
    if name not in RUNTIMES:
        raise VlaserveError("runtime", name, f"one of {sorted(RUNTIMES)}")
    return RUNTIMES[name](version_dir, output_names, device, threads)
