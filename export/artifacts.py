"""Write and run the two artifact formats: ONNX (for ONNX Runtime) and TorchScript (for torch).

Both take and give the same tensors as :class:`vlaserve.model.policy.Encoder` / :class:`vlaserve.model.policy.Decoder`;
the batch dimension is dynamic in both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vlaserve.errors import VlaserveError
from vlaserve.interface import ONNX_DATA_FILE, ONNX_FILE, TORCHSCRIPT_FILE

ONNX_OPSET = 17
TWO_GB = 2**31


def export_onnx(module: torch.nn.Module, example: tuple, input_names, output_names, out_dir: Path) -> list[str]:
    """Export to ``out_dir/model.onnx`` (weights in ``model.onnx.data`` when over 2 GB); check it; return files."""
    import onnx

    dynamic_axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        raw = Path(tmp) / ONNX_FILE  # the exporter may scatter large weights over many files here
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer notes
            torch.onnx.export(
                module,
                example,
                str(raw),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        proto = onnx.load(str(raw))
        param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        external = param_bytes >= TWO_GB
        onnx.save_model(
            proto,
            str(out_dir / ONNX_FILE),
            save_as_external_data=external,
            location=ONNX_DATA_FILE,
            all_tensors_to_one_file=True,
        )
    onnx.checker.check_model(str(out_dir / ONNX_FILE))  # by path, so external data over 2 GB is checked too
    return [ONNX_FILE, ONNX_DATA_FILE] if external else [ONNX_FILE]


SCALAR_READS = {"aten::Int", "aten::Float", "aten::ScalarImplicit", "aten::FloatImplicit", "aten::item"}


def capture_hazards(traced: torch.jit.ScriptModule) -> list[str]:
    """Places where the trace reads a Python number out of a tensor that is not a traced size.

    A size read from a tensor is traced as a small CPU tensor, and arithmetic with a Python constant
    makes that constant a tensor too; loaded onto a GPU (``map_location``) such constants move there, and
    reading the number back is a device sync: CUDA-graph capture fails on it, and every plain call waits.
    """
    hazards = []

    def from_device(value, seen) -> bool:
        node = value.node()
        if node in seen:
            return False
        seen.add(node)
        kind = node.kind()
        if kind in ("prim::NumToTensor", "aten::size"):
            return False
        if kind in ("prim::Constant", "prim::GetAttr", "prim::Param"):
            return isinstance(value.type(), torch._C.TensorType)
        return any(from_device(v, seen) for v in node.inputs() if isinstance(v.type(), torch._C.TensorType))

    for node in traced.inlined_graph.nodes():
        if node.kind() in SCALAR_READS and from_device(next(node.inputs()), set()):
            where = node.sourceRange().strip().splitlines()
            hazards.append(f"{node.kind()} at {where[0] if where else node}")
    return hazards


def export_torchscript(module: torch.nn.Module, example: tuple, out_dir: Path) -> list[str]:
    """Trace to ``out_dir/model.pt``; return the files written. A trace with a capture hazard is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)
    hazards = capture_hazards(traced)
    if hazards:
        raise VlaserveError(
            "torchscript trace", "; ".join(hazards[:3]), "no number read back from a tensor (see capture_hazards)"
        )
    traced.save(str(out_dir / TORCHSCRIPT_FILE))
    return [TORCHSCRIPT_FILE]


def run_onnx(out_dir: Path, inputs: dict[str, np.ndarray], threads: int = 0) -> list[np.ndarray]:
    """Run the ONNX artifact with ONNX Runtime on the CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(out_dir / ONNX_FILE), opts, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def run_torchscript(out_dir: Path, inputs: list[torch.Tensor]) -> tuple:
    """Run the TorchScript artifact with torch, on the device of the inputs."""
    module = torch.jit.load(str(out_dir / TORCHSCRIPT_FILE), map_location=inputs[0].device)
    with torch.no_grad():
        out = module(*inputs)
    return out if isinstance(out, tuple) else (out,)


@dataclasses.dataclass(frozen=True)
class Exporter:
    """How export writes one artifact format and runs it back for the parity check."""

    write: Callable  # (module, example inputs as a tuple, input names, output names, folder) -> files written
    run: Callable  # (folder, inputs by name as torch tensors) -> outputs in order
    dtypes: tuple[str, ...]  # the export dtypes this format can hold
    files: tuple[str, ...]  # every file it may write (a new export removes them first)


def _write_torchscript(module, example, input_names, output_names, out_dir: Path) -> list[str]:
    return export_torchscript(module, example, out_dir)


def _run_onnx_parity(out_dir: Path, inputs: dict) -> list:
    return run_onnx(out_dir, {k: v.cpu().numpy() if v.dtype != torch.bfloat16 else v for k, v in inputs.items()})


def _run_torchscript_parity(out_dir: Path, inputs: dict) -> tuple:
    return run_torchscript(out_dir, list(inputs.values()))


# Every artifact format export can write, in the order it writes them. A runtime (vlaserve.runtimes.RUNTIMES)
# executes one of these formats; docs/DESIGN.md says how to add either.
EXPORTERS = {
    # ONNX Runtime has no bf16 kernels for most operators: bf16 ships as TorchScript only
    "onnx": Exporter(export_onnx, _run_onnx_parity, ("fp32", "fp16"), (ONNX_FILE, ONNX_DATA_FILE)),
    "torchscript": Exporter(_write_torchscript, _run_torchscript_parity, ("fp32", "fp16", "bf16"), (TORCHSCRIPT_FILE,)),
}


def exporter(fmt: str) -> Exporter:
    """The exporter of ``fmt``; an unknown format is an error, never a fallback to another one."""
    if fmt not in EXPORTERS:
        raise VlaserveError("artifact format", fmt, f"one of {list(EXPORTERS)} (export.artifacts.EXPORTERS)")
    return EXPORTERS[fmt]


def all_files() -> tuple[str, ...]:
    """Every file any exporter may write."""
    return tuple(f for e in EXPORTERS.values() for f in e.files)


def formats_for(dtype: str) -> tuple[str, ...]:
    """The formats export writes for ``dtype``."""
    return tuple(fmt for fmt, e in EXPORTERS.items() if dtype in e.dtypes)


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
