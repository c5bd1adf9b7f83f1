"""The two runtimes a runner model can execute its artifact with: ONNX Runtime and TorchScript (torch).

Each takes a dict of input tensors by name and returns the outputs in the manifest's order. ONNX
Runtime works on numpy arrays; TorchScript on torch tensors, on the CPU or a CUDA device.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np

from vlaserve.errors import VlaserveError
from vlaserve.interface import ONNX_FILE, TORCHSCRIPT_FILE
from vlaserve.manifest import Manifest, TensorSpec


class OnnxRuntime:
    """An ONNX Runtime session; the CUDA provider on a GPU instance where onnxruntime has one."""

    format = "onnx"  # the artifact format it executes (export writes it: export.artifacts.EXPORTERS)
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


# Graph choices of the compiled decoder that may fail where others run (a Triton version or GPU that cannot
# compile them): each is checked alone against the artifact, and only a failing one is dropped.
OPTIONAL_CHOICES = ("fused", "triton_attention")


class TorchScriptRuntime:
    """A TorchScript module run under ``torch.inference_mode``; on a GPU, optionally from CUDA graphs, and
    optionally as the Python model it was traced from with its layers compiled by Inductor (:meth:`compile`)."""

    format = "torchscript"
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
        self.compiled = None  # the Python module with compiled layers, once compile() succeeded
        self.compiled_rel: dict[str, float] = {}  # attention choice -> rel error against the TorchScript module
        self.compile_backend = ""
        # offer the decoder's Triton kernels as graph choices (OPTIONAL_CHOICES; vlaserve.model.kernels)
        self.fused_kernels = False
        self.fused_note = ""  # why any of them was dropped
        self.dropped: set[str] = set()  # optional choices (OPTIONAL_CHOICES) that failed their check
        self.precision: str | None = None  # "fp8": the module's fp8_targets in float8 (vlaserve.model.fp8)
        self.precision_note = ""  # why fp8 was not used, if it was asked for and not
        self.compile_overrides: dict = {}  # Inductor settings over the layers' own (compile_layers), to compare

    def _call(self, *tensors) -> list:
        if self.compiled is not None:
            out = self.compiled(*tensors)
        else:
            # Without the optimizing executor: it re-profiles and re-fuses every new input shape, which took
            # long enough for pi0 on the H200 that queued requests timed out (docs/BENCHMARKS.md).
            with self.torch.jit.optimized_execution(False):
                out = self.module(*tensors)
        return list(out) if isinstance(out, tuple) else [out]

    def attention_choices(self) -> dict:
        """The attention implementations a CUDA graph may be captured with: {name: context manager factory}."""
        choices = sdpa_choices(self.torch)
        if self.compiled is not None:
            choices.update(self._compiled_choices(self.compile_backend, self.compiled))
        return choices

    def _compiled_choices(self, backend: str, module) -> dict:
        """SDPA as it comes, :func:`vlaserve.model.policy.attention_math` compiled, and with ``fused_kernels``
        the decoder's Triton kernels (each of :data:`OPTIONAL_CHOICES`): the whole expert layer fused
        ("fused"), and attention alone in Triton inside the compiled model ("triton_attention"). What
        :meth:`compile` checks."""
        triton_kernels = self.fused_kernels and backend == "inductor"  # Triton kernels: a CUDA device
        choices = compiled_attention_choices(self.torch, backend, triton_attention=triton_kernels)
        if triton_kernels:

            def fused():  # imported here: a failure drops this choice only (_check_optional), not the compiled model
                from vlaserve.model.kernels import fused_forward

                return fused_forward(module)

            triton = choices.pop("triton_attention")
            choices.update(fused=fused, triton_attention=triton)  # the order the graphs try them in, as before
        return {name: c for name, c in choices.items() if name not in self.dropped}

    def _check_optional(self, name: str, context, module, inputs, ref, tolerance: float, rel: dict) -> str:
        """Run an optional choice once against the artifact's answer; returns why it is dropped, or ""."""
        from vlaserve.model.parity import compare

        try:
            with self.torch.inference_mode(), context():
                out = module(*inputs)
        except Exception as exc:  # noqa: BLE001 - e.g. a Triton compile error on another GPU or Triton version
            if self.device.startswith("cuda"):
                self.torch.cuda.synchronize(self.device)
            why = f"{name} dropped: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        else:
            rel[name] = compare((out[0] if isinstance(out, tuple) else out).float(), ref.float())["rel"]
            if rel[name] <= tolerance:
                return ""
            why = f"{name} dropped: rel {rel[name]:.2g} against the artifact > {tolerance:g}"
        if name == "fused":
            self._release_fused(module)
        return why

    @staticmethod
    def _release_fused(module) -> None:
        """No graph will replay the fused kernels: the copies of the weights they keep (about 0.4 GB for pi0)
        can go."""
        kernels = sys.modules.get("vlaserve.model.kernels")  # not imported (or failed to): nothing was made
        if kernels is not None and getattr(module, "policy", None) is not None:
            kernels.release_scaled_weights(module.policy)

    def compile(self, manifest: Manifest, batch: int = 1, backend: str = "inductor") -> str:
        """Run the Python model the artifact was traced from (``manifest``'s preset and views, the artifact's
        own weights) with each layer compiled by ``torch.compile`` (fused elementwise kernels, a few seconds
        per layer kind and batch size); returns why not, or "" when in use.

        Checked before use: at ``batch`` on random inputs, with every attention choice, the compiled model
        must match the TorchScript module within the export's parity tolerance for the dtype, or the
        TorchScript module stays in use. Compilation happens per input shape, on first use (the CUDA-graph
        warm-up does it for every bucket). Inductor is for CUDA here; ``backend="eager"`` (any device)
        traces with TorchDynamo but compiles nothing, for tests."""
        torch = self.torch
        self.dropped, self.fused_note = set(), ""  # each compile checks every optional choice afresh
        if backend == "inductor" and not self.device.startswith("cuda"):
            return f"no CUDA device here ({self.device} instance): running the TorchScript module uncompiled"
        from vlaserve.model.parity import REL_TOLERANCE, compare, judged_as

        if not Path(sys.executable).name.startswith("python"):
            # In Triton's Python-backend stub, sys.executable is not a Python that could run Inductor's
            # compile workers: compile in this process.
            import torch._inductor.config

            torch._inductor.config.compile_threads = 1
        try:
            module = python_module(torch, manifest, self.module.state_dict())
            if self.precision == "fp8":
                self._to_fp8(module, backend)
            compile_layers(torch, module, backend, self.compile_overrides)
            inputs = [random_input(torch, spec, batch, self.device, manifest.vocab_size, seed=i)
                      for i, spec in enumerate(manifest.inputs.values())]  # fmt: skip
            rel = {}
            with torch.inference_mode():
                with torch.jit.optimized_execution(False):
                    ref = self.module(*inputs)
                ref = ref[0] if isinstance(ref, tuple) else ref
                choices = self._compiled_choices(backend, module)
                optional = {name: choices.pop(name) for name in OPTIONAL_CHOICES if name in choices}
                for name, context in choices.items():
                    with context():
                        out = module(*inputs)
                    rel[name] = compare((out[0] if isinstance(out, tuple) else out).float(), ref.float())["rel"]
        except Exception as exc:  # noqa: BLE001 - the TorchScript module still serves; the status says why
            if self.device.startswith("cuda"):
                torch.cuda.synchronize(self.device)
            return f"compiling failed, running the TorchScript module: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        tolerance = REL_TOLERANCE[judged_as(manifest.dtype, self.precision)]
        # the Triton kernels are optional choices: one that fails is dropped alone, and the status says why
        notes = [
            self._check_optional(name, context, module, inputs, ref, tolerance, rel)
            for name, context in optional.items()
        ]
        self.fused_note = "; ".join(n for n in notes if n)
        self.dropped = {name for name, note in zip(optional, notes) if note}
        bad = {name: r for name, r in rel.items() if name not in OPTIONAL_CHOICES and not r <= tolerance}  # NaN too
        if bad:
            name, r = next(iter(bad.items()))
            return (
                f"the compiled model differs from the TorchScript artifact with {name} attention (rel {r:.2g} > "
                f"{tolerance:g}; was vlaserve/model/policy.py changed since the export?): running the TorchScript module"
            )
        self.compiled, self.compile_backend = module, backend
        self.compiled_rel = {k: float(f"{v:.3g}") for k, v in rel.items()}
        return ""

    def _to_fp8(self, module, backend: str) -> None:
        """The module's fp8 products in float8; where this device cannot run them (or the module has none), it
        stays in its own dtype and ``precision`` / ``precision_note`` say so."""
        from vlaserve.model.fp8 import fp8_unsupported, to_fp8

        why = "" if backend != "inductor" else fp8_unsupported(self.device)  # tests run fp8 on the CPU, eager
        if not hasattr(module, "fp8_targets"):
            why = f"{type(module).__name__} has no fp8 products"
        if why:
            self.precision, self.precision_note = (
                None,
                f"fp8 asked for, not used: {why}",
            )
            return
        to_fp8(module.fp8_targets())

    def capture_graphs(self, buckets, input_specs: dict[str, TensorSpec]) -> str:
        """Capture one CUDA graph per batch size in ``buckets``; returns why not, or "" when captured.

        ``input_specs`` is the manifest's inputs; the graphs' static inputs are made from
        it. On a CPU instance (or without CUDA) nothing is captured and every call runs the module."""
        if not self.device.startswith("cuda"):
            return f"no CUDA device here ({self.device} instance): running without CUDA graphs"
        graphs = CudaGraphs(self.torch, self._call, self.device, self.attention_choices())
        try:
            with self.torch.inference_mode():
                for batch in sorted(buckets, reverse=True):  # the largest first: the smaller reuse its pool
                    graphs.capture(
                        [static_input(self.torch, spec, batch, self.device) for spec in input_specs.values()]
                    )
        except RuntimeError as exc:  # the module is still usable without graphs; the status says why
            self.torch.cuda.synchronize(self.device)
            if self.fused_kernels:
                self._release_fused(self.compiled)
            return f"CUDA-graph capture failed at batch {batch}, running without graphs: {str(exc).splitlines()[0]}"
        self.graphs = graphs
        if self.fused_kernels and "fused" not in graphs.chosen.values():  # no bucket kept them
            self._release_fused(self.compiled)
        return ""

    def run(self, inputs: dict) -> list:
        tensors = list(inputs.values())
        with self.torch.inference_mode():
            if self.graphs is not None and self.graphs.has(len(tensors[0])):
                return self.graphs.replay(tensors)  # copies host inputs straight into the static ones
            return self._call(*(t.to(self.device, non_blocking=True) for t in tensors))


def static_input(torch, spec: TensorSpec, batch: int, device: str):
    """A valid input of ``spec`` (manifest dtype and per-item shape) at ``batch``: ones for masks and token
    ids (a valid token, an all-valid mask: no empty attention row), zeros for everything else."""
    dtype = getattr(torch, spec.dtype)
    shape = (batch, *spec.shape[1:])
    if dtype in (torch.bool, torch.int32, torch.int64):
        return torch.ones(shape, dtype=dtype, device=device)
    return torch.zeros(shape, dtype=dtype, device=device)


def random_input(torch, spec: TensorSpec, batch: int, device: str, vocab_size: int, seed: int):
    """A random valid input of ``spec``: frames in 0..255, token ids in 1..vocab-1, masks valid at the first
    position and random after it, normal values for floating tensors."""
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, spec.dtype)
    shape = (batch, *spec.shape[1:])
    if dtype == torch.uint8:
        value = torch.randint(0, 256, shape, generator=gen, dtype=dtype)
    elif dtype in (torch.int32, torch.int64):
        value = torch.randint(1, vocab_size, shape, generator=gen, dtype=dtype)
    elif dtype == torch.bool:
        value = torch.rand(shape, generator=gen) < 0.8
        value[:, 0] = True
    else:
        value = torch.randn(shape, generator=gen).to(dtype)
    return value.to(device)


def python_module(torch, manifest: Manifest, state_dict: dict):
    """The ``vlaserve.model.policy`` Encoder or Decoder of ``manifest`` (preset, views), holding ``state_dict``'s
    tensors themselves (no copy: built on the meta device, then assigned)."""
    from vlaserve.value_check import meta_module

    module = meta_module(torch, manifest)
    missing, unexpected = module.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise VlaserveError(
            f"{manifest.model} artifact weights",
            f"{len(missing)} missing (e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})",
            "the parameter layout of vlaserve/model/policy.py (re-export: make export)",
        )
    return module.eval()


def compile_layers(torch, module, backend: str = "inductor", overrides: dict | None = None) -> list:
    """Replace each layer's methods by ``torch.compile``'d ones (static shapes). One layer at a time rather
    than the whole model: every layer of a kind shares one compiled graph (its weights are inputs), so
    compiling takes seconds, not the minutes a whole unrolled pi0 takes (131 s with mode="reduce-overhead"
    on the H200; max-autotune had not finished after 7 minutes). Each layer gets the Inductor settings its
    module names for it, then ``overrides`` (for benchmarks that compare settings). Returns the (object,
    method name) pairs it replaced, each now an attribute of the instance."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)  # shapes x kinds

    def compiled(fn, settings: dict):
        options = {**settings, **(overrides or {})}
        if backend != "inductor" or not options:  # settings are Inductor's; other backends take none
            return torch.compile(fn, dynamic=False, backend=backend)
        return torch.compile(fn, dynamic=False, backend=backend, options=options)

    replaced = []
    for owner, method, settings in module.compile_targets():  # each model's module names its layers
        setattr(owner, method, compiled(getattr(owner, method), settings))
        replaced.append((owner, method))
    return replaced


_COMPILED_ATTENTION: dict[str, object] = {}


def _compiled_attention_math(torch, backend: str = "inductor"):
    """``vlaserve.model.policy.attention_math`` compiled once per process and backend."""
    if backend not in _COMPILED_ATTENTION:
        from vlaserve.model.policy import attention_math

        _COMPILED_ATTENTION[backend] = torch.compile(attention_math, dynamic=False, backend=backend)
    return _COMPILED_ATTENTION[backend]


def compiled_attention_choices(torch, backend: str = "inductor", triton_attention: bool = False) -> dict:
    """The attention choices a compiled model's graphs may also be captured with: {name: context manager
    factory}: its own SDPA ("default"), the written-out attention compiled ("compiled_math") and, for the
    decoder with ``fused_kernels``, the attention kernel of vlaserve.model.kernels ("triton_attention";
    imported when used, so that a failure drops that choice only)."""
    from vlaserve.model.policy import attention_override

    impl = _compiled_attention_math(torch, backend)
    choices = {"default": contextlib.nullcontext, "compiled_math": lambda: attention_override(impl)}
    if triton_attention:

        def triton():
            from vlaserve.model.kernels import triton_attention as kernel

            return attention_override(kernel)

        choices["triton_attention"] = triton
    return choices


def sdpa_choices(torch) -> dict:
    """SDPA kernels a graph may be captured with: {name: context manager factory}; the first is torch's own
    choice. For pi0's decoder (a few hundred queries, head_dim 256, an additive mask) torch's first choice,
    cuDNN, took 54 us per call on the H200 (docs/BENCHMARKS.md), so each bucket keeps the fastest."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return {
        "default": contextlib.nullcontext,
        "efficient": lambda: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]),
        "math": lambda: sdpa_kernel([SDPBackend.MATH]),
    }


class CudaGraphs:
    """One captured CUDA graph per batch size over ``fn`` (tensors -> list of tensors), sharing one memory
    pool. Each batch size is captured once per attention choice ({name: context manager factory}, the
    first being the default), and the fastest replay is kept. A call copies its inputs into the graph's
    static inputs, replays it, and returns copies of the static outputs (the next replay overwrites them)."""

    def __init__(self, torch, fn, device: str, choices: dict):
        self.torch, self.fn, self.device, self.choices = torch, fn, device, choices
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple] = {}  # batch -> (graph, static inputs, static outputs)
        self.timings: dict[int, dict[str, float]] = {}  # batch -> {choice: replay ms}
        self.chosen: dict[int, str] = {}
        self.failed: dict[int, dict[str, str]] = {}  # batch -> {choice: why it did not capture}

    def has(self, batch: int) -> bool:
        return batch in self.graphs

    def _capture_one(self, static_inputs: list):
        torch = self.torch
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm up outside the capture (lazy inits, compiles, cuBLAS handles)
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
        for i, (choice, context) in enumerate(self.choices.items()):
            try:
                with context():
                    graph, outputs = self._capture_one(static_inputs)
            except Exception as exc:  # noqa: BLE001 - e.g. Triton's OutOfResources, not a RuntimeError
                if i == 0:
                    raise  # the default must capture; the others may not apply to this model
                self.torch.cuda.synchronize(self.device)
                self.failed.setdefault(batch, {})[choice] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                continue
            ms = self._replay_ms(graph)
            self.timings.setdefault(batch, {})[choice] = round(ms, 3)
            if best is None or ms < best[0]:
                best = (ms, choice, graph, outputs)
        _, self.chosen[batch], graph, outputs = best
        self.graphs[batch] = (graph, static_inputs, outputs)

    def replay(self, tensors: list) -> list:
        graph, static_inputs, static_outputs = self.graphs[len(tensors[0])]
        for static, tensor in zip(static_inputs, tensors):
            static.copy_(tensor, non_blocking=True)
        graph.replay()
        return [out.clone() for out in static_outputs]


# The runtimes a spec may name (models.<model>.runtime). A runtime is a class like the two above: its
# ``format`` (an artifact format export.artifacts.EXPORTERS writes), ``tensor_kind`` ("numpy" or "torch"),
# ``device``, and ``__call__(inputs by name) -> outputs in the manifest's order``; docs/DESIGN.md says how
# to add one.
RUNTIMES = {"onnxruntime": OnnxRuntime, "torchscript": TorchScriptRuntime}


def load_runtime(name: str, version_dir: Path, output_names, device: str = "cpu", threads: int = 0):
    """The runtime called ``name`` over the artifacts in ``version_dir``."""
    if name not in RUNTIMES:
        raise VlaserveError("runtime", name, f"one of {sorted(RUNTIMES)}")
    return RUNTIMES[name](version_dir, output_names, device, threads)
