"""Value checks that every model instance runs before it reports ready, and that ``make mps-check`` sweeps.

Why: under an MPS thread limit, bf16 and fp16 matrix products from cuBLAS can come out wrong with no
error at all (whole output tiles; measured on the H200 at most percentages, right at a few, see
docs/BENCHMARKS.md). Which percentages are affected depends on the GPU, the driver and the product's
shape, so no list of good ones can be written down: each instance proves its answers right under its
own share, on the GPU it runs on.

Two checks, in the order an instance runs them:

1. :func:`screen_products`, before the model loads: every matrix product the model issues as ``linear``,
   ``matmul``, ``mm``, ``addmm``, ``bmm`` or ``baddbmm`` at each of its batch sizes (recorded from the
   model itself by :func:`record_products`, on the meta device: no memory, no compute) is run on the
   instance's device in the serving dtype and compared with the same product in float32 (float64 for an
   fp32 model), TF32 off. The products inside fused attention kernels are not among them: the golden
   samples cover those. Under a second of GPU time for pi0; the recording costs CPU seconds, once per
   model, batch sizes and torch version (:func:`cached_products`).
2. :func:`check_golden`, once the model is ready to serve (compiled layers, CUDA graphs, the chosen
   attention): the golden samples that ``make export`` wrote beside the artifact (fixed inputs and the
   outputs the export computed for them) go through the exact serving path at every batch size, and
   must match within the export's parity tolerance for the dtype.

``value_check`` in the spec says what a failed check does: ``refuse`` (the default: the instance does
not load, and the server does not start), ``warn`` (log and serve anyway: dangerous), ``off``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from vlaserve.errors import VlaserveError
from vlaserve.files import write_whole
from vlaserve.interface import GOLDEN_FILE
from vlaserve.manifest import Manifest, ModelSettings

if TYPE_CHECKING:
    import numpy as np

VALUE_CHECK_MODES = ("refuse", "warn", "off")
GOLDEN_ITEMS = 2  # distinct requests in a golden sample; larger batches repeat them
GOLDEN_SEED = 424242
# Largest allowed max|out - ref| / max|ref| of one product against its float32 (fp32: float64) reference.
# Rounding the output to bf16 costs up to 2^-8 of an element; a wrong tile costs the size of the values.
PRODUCT_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 2e-2}
TORCH_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
PRODUCT_OPS = ("linear", "mm", "addmm", "bmm", "baddbmm", "matmul")
MPS_CHECK_ENV = "VLASERVE_MPS_CHECK"  # the JSON that `make mps-check` wrote: safe percentages per GPU
MPS_CHECK_FILE = "mps-check.json"  # its default name, in the server's --workdir
PRODUCTS_CACHE = "products"  # recorded products, kept in the server's --workdir (see cached_products)
FAULT_ENV = "VLASERVE_FAULT_INJECT"  # for tests only: "products" corrupts every screened product


class ValueCheckError(VlaserveError):
    """An instance whose answers are wrong on this device and share: it must not serve."""

    def __init__(self, line: str):
        self.field, self.value, self.expected = "value check", line, "right answers"
        Exception.__init__(self, line)


# ---- the model's products ---------------------------------------------------------------------------
def meta_module(torch, manifest: Manifest):
    """The module of ``manifest``'s model (``vlaserve.model.policy.STAGES``) for its preset, views, prompt
    positions and dtype, on the meta device: its structure and shapes, no weights."""
    from vlaserve.model.policy import STAGES, Policy
    from vlaserve.model.presets import get_preset

    with torch.device("meta"):
        cfg = get_preset(manifest.preset, manifest.views, manifest.prompt_tokens)
        policy = Policy(cfg).to(getattr(torch, TORCH_DTYPE[manifest.dtype]))
    return STAGES[manifest.model](policy).eval()


def cached_products(manifest: Manifest, batches, cache_dir: Path | None) -> list[dict]:
    """:func:`record_products`, kept in ``cache_dir`` (keyed by the model's structure, the batch sizes and the
    torch version): recording walks the whole model on the meta device, which took 23 s of CPU for pi0's
    decoder at five batch sizes on a 2-core machine; a restart reads the file."""
    import hashlib

    import torch

    if cache_dir is None:
        return record_products(manifest, batches)
    what = [getattr(manifest, k) for k in ("model", "preset", "views", "dtype", "prompt_tokens")] + [
        {name: dataclasses.asdict(spec) for name, spec in manifest.inputs.items()},
        sorted(set(batches)),
        torch.__version__,
    ]
    path = Path(cache_dir) / f"{manifest.model}-{hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    products = record_products(manifest, batches)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, json.dumps(products))  # instances starting side by side may both write it
    return products


def record_products(manifest: Manifest, batches) -> list[dict]:
    """Every distinct matrix product the model runs at each batch size in ``batches``, with both attention
    implementations the runtime may serve with (SDPA, and :func:`vlaserve.model.policy.attention_math`):
    ``[{"op", "shapes", "strides", "dtypes", "batch"}]`` (the first batch size a product was seen at)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from vlaserve.model.policy import attention_math, attention_override

    seen: dict[tuple, dict] = {}

    class Recorder(TorchDispatchMode):
        batch = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if name in PRODUCT_OPS and len(tensors) >= 2:
                key = (name, *((tuple(t.shape), tuple(t.stride())) for t in tensors))
                seen.setdefault(key, {
                    "op": name, "shapes": [list(t.shape) for t in tensors], "strides": [list(t.stride()) for t in tensors],
                    "dtypes": [str(t.dtype).removeprefix("torch.") for t in tensors], "batch": self.batch,
                })  # fmt: skip
            return func(*args, **(kwargs or {}))

    module = meta_module(torch, manifest)
    for batch in sorted(set(batches)):
        inputs = [torch.empty((batch, *s.shape[1:]), dtype=getattr(torch, s.dtype), device="meta")
                  for s in manifest.inputs.values()]  # fmt: skip
        for override in (None, attention_math):
            recorder = Recorder()
            recorder.batch = batch
            with (
                torch.inference_mode(),
                recorder,
                attention_override(override) if override else contextlib.nullcontext(),
            ):
                module(*inputs)
    return list(seen.values())


def _describe(product: dict) -> str:
    shapes = " x ".join("x".join(map(str, s)) for s in product["shapes"])
    return f"{product['op']} {shapes} (batch {product['batch']})"


def screen_products(products: list[dict], dtype: str, device: str, seed: int = 0) -> dict:
    """Run each recorded product on ``device`` with random data in its recorded layout, in the serving
    dtype, against the same product in float32 with TF32 off (float64 when the model is fp32).

    Returns {"worst", "where", "products", "seconds", "tolerance"}; "worst" is the largest
    max|out - ref| / max|ref| over the products (NaN counts as infinite)."""
    import torch

    started = time.perf_counter()
    ref_dtype = torch.float64 if dtype == "fp32" else torch.float32
    fault = os.environ.get(FAULT_ENV) == "products"
    gen = torch.Generator(device=device).manual_seed(seed)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    worst, where = 0.0, ""
    try:
        with torch.inference_mode():
            for product in products:
                args = out = ref = None  # the last product's memory back before the next one
                args = []
                for shape, stride, name in zip(product["shapes"], product["strides"], product["dtypes"]):
                    t = torch.empty_strided(shape, stride, dtype=getattr(torch, name), device=device)
                    args.append(t.normal_(generator=gen) if t.is_floating_point() else t.fill_(1))
                op = getattr(torch.ops.aten, product["op"])
                try:
                    out = op(*args)
                    ref = op(*(a.to(ref_dtype) if a.is_floating_point() else a for a in args))
                except torch.OutOfMemoryError:
                    raise VlaserveError(
                        "product screen", f"out of memory at {_describe(product)} on {device}",
                        "free device memory for the largest product at the largest batch size (or value_check: off)",
                    ) from None  # fmt: skip
                if fault:
                    out = out.clone()
                    out.view(-1)[: max(1, out.numel() // 4)] = 0  # a wrong tile, as under a bad MPS share
                err = (out.to(ref_dtype) - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
                err = float(err) if torch.isfinite(err) else float("inf")
                if err > worst or not where:
                    worst, where = max(err, worst), _describe(product)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        args = out = ref = None
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    return {
        "worst": worst,
        "where": where,
        "products": len(products),
        "seconds": round(time.perf_counter() - started, 2),
        "tolerance": PRODUCT_TOLERANCE[dtype],
    }


# ---- golden samples ---------------------------------------------------------------------------------
def write_golden(version_dir: Path, inputs: dict, outputs: dict) -> str:
    """Save a golden sample (torch tensors on any device, batch-first) beside the artifact; returns the file."""
    import torch

    sample = {
        "inputs": {k: v.detach().cpu().contiguous() for k, v in inputs.items()},
        "outputs": {k: v.detach().cpu().contiguous() for k, v in outputs.items()},
    }
    torch.save(sample, Path(version_dir) / GOLDEN_FILE)
    return GOLDEN_FILE


def load_golden(version_dir: Path) -> dict:
    import torch

    path = Path(version_dir) / GOLDEN_FILE
    if not path.is_file():
        raise VlaserveError("golden sample", str(path), f"a {GOLDEN_FILE} written by `make export` (re-export)")
    return torch.load(path, map_location="cpu", weights_only=True)


def golden_reference(repo: Path) -> tuple[dict, np.ndarray]:
    """A batch-1 policy request made of the export's golden samples (item 0) and the actions the export
    computed for it in-process (eager PyTorch on the export's device): a reference for served answers that
    needs no in-process run where it is used."""
    from vlaserve import interface as io

    goldens = {step.model: load_golden(Path(repo) / step.model / "1") for step in io.PIPELINE}
    request = {}
    for name in io.request_inputs():  # from the first step that takes it
        step = next(s for s in io.PIPELINE if name in s.inputs)
        tensor = goldens[step.model]["inputs"][name][:1]
        request[name] = (tensor.float() if tensor.is_floating_point() else tensor).numpy()
    last = io.PIPELINE[-1]
    return request, goldens[last.model]["outputs"][last.outputs[0]][:1].float().numpy()


def golden_batch(golden: dict, batch: int) -> tuple[dict, dict]:
    """The golden inputs and outputs repeated (item 0, 1, 0, 1, ...) up to ``batch`` items."""
    import torch

    items = len(next(iter(golden["inputs"].values())))
    index = torch.arange(batch) % items
    return ({k: v[index] for k, v in golden["inputs"].items()}, {k: v[index] for k, v in golden["outputs"].items()})


def check_golden(run, golden: dict, batches, dtype: str, as_numpy: bool = False) -> dict:
    """Run the golden inputs through ``run`` (dict of inputs -> list of outputs in the golden's order) at each
    batch size, against the golden outputs. Returns {"worst", "where", "batches", "seconds", "tolerance"}:
    "worst" is the largest relative (L2) error of any floating output, infinite for a wrong mask or NaN."""
    import numpy as np
    import torch

    from vlaserve.model.parity import REL_TOLERANCE, compare

    started = time.perf_counter()
    worst, where = 0.0, ""
    for batch in sorted(set(batches)):
        inputs, expected = golden_batch(golden, batch)
        if as_numpy:
            inputs = {k: v.numpy() for k, v in inputs.items()}
        produced = list(run(inputs))
        if len(produced) != len(expected):
            return {"worst": float("inf"), "where": f"{len(produced)} outputs at batch {batch}, expected {len(expected)}",
                    "batches": sorted(set(batches)), "seconds": round(time.perf_counter() - started, 2),
                    "tolerance": REL_TOLERANCE[dtype]}  # fmt: skip
        for (name, ref), got in zip(expected.items(), produced):
            got = torch.as_tensor(np.asarray(got) if isinstance(got, np.ndarray) else got.detach().cpu())
            if ref.dtype == torch.bool:
                err = 0.0 if torch.equal(got.bool(), ref) else float("inf")
            else:
                err = compare(got.float(), ref.float())["rel"]
                err = err if err == err else float("inf")  # NaN (a non-finite reference) fails too
            if err > worst or not where:
                worst, where = max(err, worst), f"{name} at batch {batch}"
    return {
        "worst": worst,
        "where": where,
        "batches": sorted(set(batches)),
        "seconds": round(time.perf_counter() - started, 2),
        "tolerance": REL_TOLERANCE[dtype],
    }


def passed(result: dict) -> bool:
    return result["worst"] <= result["tolerance"]  # NaN and inf fail


# ---- the share an instance runs on ---------------------------------------------------------------------
def matmul_tflops(torch, device: str, size: int = 8192, repeats: int = 10) -> float:
    """bf16 matmul rate this process's CUDA context gets: its share of the GPU."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    end.synchronize()
    rate = 2 * size**3 * repeats / (start.elapsed_time(end) * 1e-3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return round(rate, 1)


def safe_percentages(gpu: str, model: ModelSettings, path: str | None = None) -> list[int] | None:
    """The thread percentages that ``make mps-check`` found right on a GPU of this name for a model of this
    preset, views and dtype, if it ran here."""
    path = path or os.environ.get(MPS_CHECK_ENV)
    if not path or not Path(path).is_file():
        return None
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if report.get("gpu") != gpu or report.get("model") != model_key(model):
        return None
    return sorted(r["percentage"] for r in report.get("rows", []) if r.get("right"))


def model_key(settings: ModelSettings) -> dict:
    """What an mps-check report must have checked to speak for a model: its preset, views, dtype and prompt
    positions (they set the products' shapes)."""
    return dataclasses.asdict(settings)


def refusal_line(instance: str, share: str, check: str, result: dict, on_gpu: bool, safe: list[int] | None) -> str:
    """The one line a failed check logs (and refuses with): who, on what share, what was wrong, and where;
    on a GPU, also the thread percentages `make mps-check` found right there (or how to find them)."""
    line = (
        f"vlaserve value check failed: {instance} on {share}: {check} wrong, worst error {result['worst']:.3g} "
        f"(tolerance {result['tolerance']:g}) at {result['where']}"
    )
    if not on_gpu:
        return line
    if safe:
        return f"{line}; make mps-check found these thread percentages right on this GPU: {', '.join(map(str, safe))}"
    return f"{line}; run `make mps-check` to find the thread percentages that are right on this GPU"
