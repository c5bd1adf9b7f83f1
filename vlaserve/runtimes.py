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
    """A TorchScript module run under ``torch.inference_mode``."""

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

    def run(self, inputs: dict) -> list:
        # Without the optimizing executor: it re-profiles and re-fuses every new input shape, which took
        # long enough for pi0 on the H200 that queued requests timed out (docs/BENCHMARKS.md).
        with self.torch.inference_mode(), self.torch.jit.optimized_execution(False):
            out = self.module(*(t.to(self.device, non_blocking=True) for t in inputs.values()))
        return list(out) if isinstance(out, tuple) else [out]


RUNTIMES = {"onnxruntime": OnnxRuntime, "torchscript": TorchScriptRuntime}


def load_runtime(name: str, version_dir: Path, output_names, device: str = "cpu", threads: int = 0):
    """The runtime called ``name`` over the artifacts in ``version_dir``."""
    if name not in RUNTIMES:
        raise VlaserveError("runtime", name, f"one of {sorted(RUNTIMES)}")
    return RUNTIMES[name](version_dir, output_names, device, threads)
