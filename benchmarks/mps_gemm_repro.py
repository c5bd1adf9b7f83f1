"""Self-contained repro: bf16 matrix products from cuBLAS come out wrong under an MPS thread limit.

Needs only PyTorch with CUDA and the NVIDIA driver's MPS binaries; no other file of this repository.
Attach its output to an upstream bug report.

    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    nvidia-cuda-mps-control -d                        # as root, GPU in the Default compute mode
    python mps_gemm_repro.py --percentages 40,50,60,100
    echo quit | nvidia-cuda-mps-control

For each percentage a child process starts with ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` set before its CUDA
context exists. It runs ``F.linear`` in bf16 at a few shapes against the same product in float32 (TF32
off) on the same inputs, and prints per way of computing it whether every output is right
(max|out - ref| / max|ref| <= 2e-2) and the rate. The ways tried, each a possible workaround:

- ``cublas``: PyTorch's default;
- ``cublaslt``: ``torch.backends.cuda.preferred_blas_library("cublaslt")``;
- ``lt_target<N>``: cuBLASLt told to aim at N SMs (``torch._C._set_sm_carveout_experimental``, which
  sets ``CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET``), for N = 32 and 12 where fewer SMs are visible;
- ``tf32``: the inputs in float32 with TF32 tensor-core products (fp32 accumulation, 10-bit mantissa);
- ``triton``: ``torch.compile`` max-autotune with only Triton-language GEMM templates (``--triton``;
  Inductor's small-GPU switch overridden, since the limited device reports fewer than 68 SMs).

The cuBLAS kernel that ran for each shape (PyTorch profiler) is printed for the default way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHAPES = [
    (51, 1024, 2560),
    (51, 1024, 8192),
    (51, 4096, 1024),
    (408, 1024, 2048),
    (560, 2048, 32768),
    (512, 1152, 3456),
    (4096, 4096, 4096),
]  # fmt: skip  (M, K, N): pi0 decoder, prefix, vision sizes
TOLERANCE = 2e-2


def wrong_fraction(out, ref) -> float:
    """Share of outputs more than 5 % of max|ref| off; NaN and inf count as wrong."""
    return float((~((out.float() - ref).abs() <= 0.05 * ref.abs().max())).float().mean())


def child(triton: bool) -> dict:
    import torch
    import torch.nn.functional as F

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda:0")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    gen = torch.Generator(device=dev).manual_seed(0)
    data = [(torch.randn(m, k, device=dev, generator=gen), torch.randn(n, k, device=dev, generator=gen))
            for m, k, n in SHAPES]  # fmt: skip
    refs = [F.linear(x, w) for x, w in data]

    def measure(fn, cast):
        worst, seconds, flops, per_shape = 0.0, 0.0, 0.0, {}
        for (x, w), ref, (m, k, n) in zip(data, refs, SHAPES):
            a, b = cast(x), cast(w)
            out = fn(a, b)
            err = float(((out.float() - ref).abs().max() / ref.abs().max()).nan_to_num(float("inf")))
            worst = max(worst, err)
            per_shape[f"{m}x{k}x{n}"] = {"error": float(f"{err:.3g}"),
                                         "wrong_fraction": float(f"{wrong_fraction(out, ref):.3g}")}  # fmt: skip
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(5):
                fn(a, b)
            torch.cuda.synchronize()
            seconds += (time.perf_counter() - start) / 5
            flops += 2 * m * k * n
        return {"right": worst <= TOLERANCE, "worst": float(f"{worst:.3g}"), "tflops": round(flops / seconds / 1e12, 1),
                "shapes": per_shape}  # fmt: skip

    bf16 = lambda t: t.to(torch.bfloat16)  # noqa: E731
    ways = {"cublas": measure(F.linear, bf16)}
    kernels = {}
    from torch.profiler import ProfilerActivity, profile

    for (x, w), shape in zip(data, SHAPES):
        a, b = bf16(x), bf16(w)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            F.linear(a, b)
            torch.cuda.synchronize()
        kernels["x".join(map(str, shape))] = [e.name for e in prof.events() if e.device_type.name == "CUDA"][:2]
    torch.backends.cuda.preferred_blas_library("cublaslt")
    ways["cublaslt"] = measure(F.linear, bf16)
    for target in (32, 12):
        if target < sms and hasattr(torch._C, "_set_sm_carveout_experimental"):
            torch._C._set_sm_carveout_experimental(sms - target)
            ways[f"lt_target{target}"] = measure(F.linear, bf16)
            try:
                torch._C._set_sm_carveout_experimental(None)
            except (TypeError, RuntimeError):
                torch._C._set_sm_carveout_experimental(0)
    torch.backends.cuda.preferred_blas_library("cublas")
    torch.backends.cuda.matmul.allow_tf32 = True
    ways["tf32"] = measure(F.linear, lambda t: t)
    torch.backends.cuda.matmul.allow_tf32 = False
    if triton:
        import torch._inductor.config as inductor_config
        import torch._inductor.utils as inductor_utils

        inductor_utils.is_big_gpu = lambda *a, **k: True
        inductor_config.max_autotune_gemm_backends = "TRITON"
        started = time.perf_counter()
        compiled = torch.compile(F.linear, mode="max-autotune-no-cudagraphs", dynamic=False)
        ways["triton"] = measure(compiled, bf16)
        ways["triton"]["compile_s"] = round(time.perf_counter() - started, 1)
    return {"sm_count": sms, "ways": ways, "kernels": kernels}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--percentages", default="40,50,60,100")
    parser.add_argument("--triton", action="store_true", help="also try Triton-language GEMMs (minutes to autotune)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.triton)), flush=True)
        return 0
    import torch

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip(), flush=True)  # fmt: skip
    results = {}
    for pct in [int(p) for p in args.percentages.split(",")]:
        env = {**os.environ, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(pct)}
        cmd = [sys.executable, __file__, "--child"] + (["--triton"] if args.triton else [])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(f"{pct} %: child failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        results[pct] = r = json.loads(line[0][len("RESULT ") :])
        ways = "  ".join(f"{k}: {'right' if v['right'] else 'WRONG'} {v['worst']:.2g} {v['tflops']} TF/s"
                         for k, v in r["ways"].items())  # fmt: skip
        print(f"{pct:3d} % ({r['sm_count']} SMs)  {ways}", flush=True)
        for shape, names in r["kernels"].items():
            check = r["ways"]["cublas"]["shapes"][shape]
            verdict = "right" if check["error"] <= TOLERANCE else f"WRONG ({check['wrong_fraction']:.0%} of outputs)"
            gemm = [n for n in names if "Memset" not in n]
            print(f"      {shape}: {verdict:26} {', '.join(n[:90] for n in gemm)}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
