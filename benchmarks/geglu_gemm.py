# ruff: noqa: N803, N806  (Triton's convention: upper-case sizes and compile-time constants)
"""The encoder's gate/up product with its GeGLU in the product's epilogue, against the compiled layer's way.

In the compiled encoder each prefix layer's MLP runs its gate/up product through cuBLAS (output [M, 2F]),
then Inductor's pointwise kernel reads both halves back and writes gelu(gate) * up ([M, F]). At batch 16
(M = 16 x 560) that product output is 587 MB a layer, written and read back; in the 2026-11-23 profile of
batch 16 the GeGLU's pointwise kernel took 3.9 ms of the encoder's 75 (raw: the compiled profile under
docs/results/). Here one Triton kernel computes the same columns of gate and up in each program and writes
gelu(gate) * up straight away, so the [M, 2F] product never reaches memory (the weight as the layer holds
it).

For each batch, at pi0's prefix sizes (K 2048, F 16384, 560 tokens an item), it times (CUDA graph replays):
- ``compiled``: ``x @ w.T`` then gelu(gate) * up, torch.compile'd (Inductor: the extern product + one fused
  pointwise kernel), as the served compiled layer computes it;
- ``fused BMxBN/BK wW sS``: the kernel below at each launch setting;
and checks each against float32. A setting whose output is off by more than the bf16 tolerance is void.

    python -m benchmarks.geglu_gemm --batches 1,16 --out $OUT/geglu-gemm.json

Not served: a benchmark first, to see whether the fused product can match cuBLAS's speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

SETTINGS = (  # (BLOCK_M, BLOCK_N of the output, i.e. of each of gate and up, BLOCK_K, warps, stages)
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 64, 64, 4, 4),
    (128, 64, 64, 8, 4),
    (256, 64, 64, 8, 3),
    (64, 128, 64, 4, 4),
)


@triton.jit
def _gelu_tanh(x):
    """GELU, tanh form (as F.gelu(approximate="tanh")); tanh written with exp for Triton's interpreter too."""
    inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return 0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0))


@triton.jit
def _geglu_matmul_kernel(a_ptr, w_ptr, o_ptr, M, K, F,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):  # fmt: skip
    """o [M, F] = gelu(a @ gate.T) * (a @ up.T), w [2F, K] the gate rows then the up rows (as
    GemmaBlock.gate_up_proj holds them). A program computes the same BLOCK_N columns of both products, in two
    accumulators, so that the GeGLU needs nothing of another program. Program order grouped by GROUP_M row
    blocks, so that neighbours share weight tiles in L2. Each product is rounded to a's dtype before the
    GELU, as the reference's product output is."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = F // BLOCK_N
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rows[:, None] * K + (k0 + ks)[None, :], mask=row_ok[:, None], other=0.0)
        gate = tl.load(w_ptr + cols[:, None] * K + (k0 + ks)[None, :])
        up = tl.load(w_ptr + (F + cols)[:, None] * K + (k0 + ks)[None, :])
        acc_gate += tl.dot(a, tl.trans(gate))
        acc_up += tl.dot(a, tl.trans(up))
    dtype = o_ptr.dtype.element_ty
    gate = acc_gate.to(dtype).to(tl.float32)
    up = acc_up.to(dtype).to(tl.float32)
    out = (_gelu_tanh(gate).to(dtype).to(tl.float32) * up).to(dtype)
    tl.store(o_ptr + rows[:, None] * F + cols[None, :], out, mask=row_ok[:, None])


def geglu_matmul(a: torch.Tensor, gate_up: torch.Tensor, setting=SETTINGS[0], group_m: int = 8):
    """gelu(a @ gate.T) * (a @ up.T) for a [M, K] and gate_up [2F, K] (gate rows, then up rows), at
    ``setting`` (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)."""
    bm, bn, bk, warps, stages = setting
    m, k = a.shape
    f = gate_up.shape[0] // 2
    if k % bk or f % bn or gate_up.shape != (2 * f, k) or not (a.is_contiguous() and gate_up.is_contiguous()):
        raise ValueError(f"geglu_matmul: a {tuple(a.shape)}, gate_up {tuple(gate_up.shape)} do not fit blocks "
                         f"({bn} columns, {bk} of K) or are not contiguous")  # fmt: skip
    out = torch.empty((m, f), dtype=a.dtype, device=a.device)
    grid = (triton.cdiv(m, bm) * (f // bn),)
    _geglu_matmul_kernel[grid](a, gate_up, out, m, k, f, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m,
                               num_warps=warps, num_stages=stages)  # fmt: skip
    return out


def reference(a: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """The compiled layer's computation of the same: the product, then GeGLU over its two halves."""
    gate, up = (a @ gate_up.T).chunk(2, dim=-1)
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def main(argv=None) -> None:
    from benchmarks.profile_runtime import replay_ms
    from vlaserve.model.parity import REL_TOLERANCE
    from vlaserve.model.presets import get_preset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,16", help="requests per batch (each 560 prefix tokens)")
    parser.add_argument("--out", required=True, help="results JSON")
    args = parser.parse_args(argv)
    cfg = get_preset("pi0", 2)
    k, f, tokens = cfg.prefix.width, cfg.prefix.mlp_dim, cfg.prefix_len
    device, dtype = "cuda", torch.bfloat16
    gen = torch.Generator(device).manual_seed(0)
    gate_up = torch.randn((2 * f, k), generator=gen, device=device, dtype=dtype) / k**0.5
    compiled = torch.compile(reference, dynamic=False)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        m = batch * tokens
        a = torch.randn((m, k), generator=gen, device=device, dtype=dtype)
        want = reference(a.float(), gate_up.float())
        flop = 2 * m * k * 2 * f
        row = {"batch": batch, "m": m}
        candidates = {"compiled": (lambda a=a: compiled(a, gate_up))}
        for setting in SETTINGS:
            name = "fused {}x{}/{} w{} s{}".format(*setting)
            candidates[name] = lambda a=a, s=setting: geglu_matmul(a, gate_up, s)
        for name, fn in candidates.items():
            try:
                out = fn()  # compiles
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                ms = replay_ms(graph.replay)
                error = rel(out, want)
                row[name] = {"ms": round(ms, 3), "tflops": round(flop / ms / 1e9, 1), "rel": float(f"{error:.3g}"),
                             "void": not error <= REL_TOLERANCE["bf16"]}  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - a setting that does not fit leaves the others' figures
                torch.cuda.synchronize()
                row[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
            print(f"[geglu] batch {batch} {name}: {row[name]}", flush=True)
        rows.append(row)
    Path(args.out).write_text(json.dumps({"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0),
                                          "torch": torch.__version__, "k": k, "f": f, "rows": rows}, indent=2))  # fmt: skip
    print(f"\n{'batch':>5} {'candidate':>28} {'ms':>8} {'TFLOP/s':>8} {'rel':>8}")
    for row in rows:
        for name, r in row.items():
            if isinstance(r, dict) and "ms" in r:
                void = " (void)" if r["void"] else ""
                print(f"{row['batch']:>5} {name:>28} {r['ms']:8.3f} {r['tflops']:8.1f} {r['rel']:8.1e}{void}")


if __name__ == "__main__":
    main()
