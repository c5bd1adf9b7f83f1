# ruff: noqa: N803  (Triton's convention: upper-case sizes and compile-time constants)
"""The decoder's four matrix products as bare Triton products, loading their tiles two ways, on a GPU.

The fused decoder's products at batch 1 wait on their own instructions, not on memory, and each program
issues the address arithmetic and the many small copies of every tile from its threads. On Hopper a tensor
descriptor instead has the copy engine (TMA) fetch a whole tile from one instruction. To learn whether the loads are
what holds the products (on the H200 they were not: docs/BENCHMARKS.md), this times, at the
expert's shapes (q/k/v, output, gate/up, down; batch x 51 rows), the same product with pointer loads and
with descriptor loads over a grid of launch settings, each split over K or not, against cuBLAS
(``torch.mm``). Each is a CUDA graph of one product per layer over 18 layers' own random weights, so the
weights come from memory, not from the cache; each setting's output on layer 0 is first compared with
PyTorch's float32 product (a setting off by more than rounding is left out).

Compilation dominates the grid, so ``--workers`` processes compile every setting first (Triton's shared
cache); the timing then runs in this process alone.

    source benchmarks/gpu_env.sh && python -m benchmarks.tma_probe --batches 1,4 --out $OUT/tma-probe.json
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from benchmarks.decoder_kernels import SMEM_BYTES, failure, in_workers, products, sync, warm_ms
from vlaserve.interface import ACTION_HORIZON
from vlaserve.model.parity import compare
from vlaserve.model.presets import get_preset

DEVICE = os.environ.get("VLASERVE_BENCH_DEVICE", "cuda:0")  # "cpu" only for a check in Triton's interpreter
LOADS = ("pointer", "descriptor")
LAYERS = 18


@triton.jit
def _tile(k_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's row and column blocks (grid axes 0 and 1), their rows and columns, and where its share of
    K starts (axis 2: the splits of K)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, pid_n, rows, cols, tl.program_id(2) * k_per_split


@triton.jit
def _write(out_ptr, acc, rows, cols, M, N, SPLITS: tl.constexpr):
    """The tile's rows under M of out: stored, or with K split added atomically (out zeroed first)."""
    dst = out_ptr + rows[:, None] * N + cols[None, :]
    if SPLITS == 1:
        tl.store(dst, acc, mask=(rows < M)[:, None])
    else:
        tl.atomic_add(dst, acc, mask=(rows < M)[:, None], sem="relaxed")


@triton.jit
def _pointer_product(x_ptr, w_ptr, out_ptr, M, N, K, k_per_split, SPLITS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """out [M, N] (float32) = x [M, K] @ w [N, K]^T, each tile loaded through its threads' pointers; split
    over K, the splits add into out atomically (out zeroed first)."""
    pid_m, pid_n, rows, cols, k_start = _tile(k_per_split, BLOCK_M, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(k_start, k_start + k_per_split, BLOCK_K, num_stages=STAGES):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows < M)[:, None], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :])
        acc += tl.dot(a, tl.trans(w))
    _write(out_ptr, acc, rows, cols, M, N, SPLITS)


@triton.jit
def _descriptor_product(x_desc, w_desc, out_ptr, M, N, k_per_split, SPLITS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """What :func:`_pointer_product` computes, each tile fetched through a tensor descriptor (rows past M
    come as zeros)."""
    pid_m, pid_n, rows, cols, k_start = _tile(k_per_split, BLOCK_M, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in tl.range(k_start, k_start + k_per_split, BLOCK_K, num_stages=STAGES):
        a = x_desc.load([pid_m * BLOCK_M, k0])
        w = w_desc.load([pid_n * BLOCK_N, k0])
        acc += tl.dot(a, tl.trans(w))
    _write(out_ptr, acc, rows, cols, M, N, SPLITS)


def block_m(rows: int) -> int:
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


def grid_settings(rows: int) -> list[tuple]:
    """(BLOCK_N, BLOCK_K, warps, stages, splits of K) to try; the row block is :func:`block_m`'s."""
    bm = block_m(rows)
    grid = itertools.product((32, 64, 128), (64, 128, 256), ((4, 3), (4, 4), (4, 6), (8, 4)), (1, 2, 4, 8))
    return [(bn, bk, w, st, s) for bn, bk, (w, st), s in grid if st * 2 * (bm + bn) * bk <= SMEM_BYTES]


def fits(setting: tuple, n: int, k: int, rows: int) -> bool:
    """Whether ``setting`` tiles an [n, k] weight: whole tiles, at least one BLOCK_K per split, and between
    64 and 1,056 programs (half to eight times the H200's 132 multiprocessors)."""
    bn, bk, _, _, s = setting
    programs = triton.cdiv(rows, block_m(rows)) * (n // bn) * s
    return n % bn == 0 and k % (s * bk) == 0 and 64 <= programs <= 1056


def launch(loads: str, x, w, out, setting) -> None:
    bn, bk, warps, stages, splits = setting
    (m, k), n = x.shape, w.shape[0]
    bm = block_m(m)
    if splits > 1:
        out.zero_()
    grid = (triton.cdiv(m, bm), n // bn, splits)
    sizes = {"SPLITS": splits, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "STAGES": stages, "num_warps": warps}
    if loads == "pointer":
        _pointer_product[grid](x, w, out, m, n, k, k // splits, **sizes)
    else:
        x_desc = TensorDescriptor.from_tensor(x, [bm, bk])
        w_desc = TensorDescriptor.from_tensor(w, [bn, bk])
        _descriptor_product[grid](x_desc, w_desc, out, m, n, k // splits, **sizes)


def weights_for(n: int, k: int, layers: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    dtype = torch.bfloat16 if DEVICE.startswith("cuda") else torch.float32  # the interpreter's bf16 dot is wrong
    return [(torch.randn((n, k), generator=gen, device=DEVICE) / k**0.5).to(dtype) for _ in range(layers)]


def run(loads: str, weights, rows: int, setting, timed: bool = True) -> tuple[float, float | None]:
    """(rel error on layer 0 against PyTorch's float32 product, µs per product over every layer; None off a
    GPU or untimed)."""
    n, k = weights[0].shape
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    x = torch.randn((rows, k), generator=gen, device=DEVICE).to(weights[0].dtype)
    out = torch.empty((rows, n), dtype=torch.float32, device=DEVICE)
    launch(loads, x, weights[0], out, setting)
    rel = compare(out, x.float() @ weights[0].float().t())["rel"]
    if not (timed and DEVICE.startswith("cuda")):
        return rel, None
    outs = [torch.empty_like(out) for _ in weights]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w, o in zip(weights, outs):
            launch(loads, x, w, o, setting)
    return rel, 1e3 * warm_ms(graph.replay, 20) / len(weights)


def cublas_us(weights, rows: int) -> float:
    x = torch.randn((rows, weights[0].shape[1]), device=DEVICE, dtype=weights[0].dtype)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode():
        for w in weights:
            torch.mm(x, w.t())
        sync()
        with torch.cuda.graph(graph):
            for w in weights:
                torch.mm(x, w.t())
    return 1e3 * warm_ms(graph.replay, 20) / len(weights)


def jobs_for(shapes: dict, batches: list[int]) -> list[tuple]:
    """(loads, kind, rows, setting) for every setting that fits each kind's weight at each batch."""
    return [
        (loads, kind, rows, s)
        for rows in (b * (1 + ACTION_HORIZON) for b in batches)
        for kind, (n, k) in shapes.items()
        for s in grid_settings(rows)
        if fits(s, n, k, rows)
        for loads in LOADS
    ]


def _compile_worker(jobs: list[tuple]) -> list[str | None]:
    """In a worker process: launch each job once on one layer's weights (filling Triton's cache); the error
    line of each that fails."""
    errors = []
    for loads, _, rows, setting, n, k in jobs:
        try:
            run(loads, weights_for(n, k, 1), rows, setting, timed=False)
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - e.g. Triton's OutOfResources
            errors.append(failure(exc))
    return errors


def compile_all(jobs: list[tuple], shapes: dict, workers: int) -> list[str | None]:
    """Each job launched once, in ``workers`` processes (the shapes are run-time arguments, so the kernels one
    kind compiles serve the others from Triton's cache)."""
    full = [(loads, kind, rows, s, *shapes[kind]) for loads, kind, rows, s in jobs]
    return _compile_worker(full) if workers <= 1 else in_workers(_compile_worker, full, workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="pi0")
    parser.add_argument("--batches", default="1", help="comma-separated batch sizes (x 51 rows each)")
    parser.add_argument("--kinds", default="qkv,out,geglu,down", help="which of the expert layer's products")
    parser.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cfg = get_preset(args.preset, 2)
    shapes = {kind: (n, k) for kind, (_, n, k) in products(cfg).items() if kind in args.kinds.split(",")}
    jobs = jobs_for(shapes, batches)
    print(f"[tma] compiling {len(jobs)} launches in {args.workers} processes ...", flush=True)
    errors = compile_all(jobs, shapes, args.workers)
    weights = {kind: weights_for(n, k, LAYERS) for kind, (n, k) in shapes.items()}
    results = []
    for rows in (b * (1 + ACTION_HORIZON) for b in batches):
        for kind in shapes:
            row = {"rows": rows, "kind": kind, "cublas_us": round(cublas_us(weights[kind], rows), 2)}
            for loads in LOADS:
                tries = []
                for (j_loads, j_kind, j_rows, setting), error in zip(jobs, errors):
                    if (j_loads, j_kind, j_rows) != (loads, kind, rows):
                        continue
                    if error:
                        tries.append({"setting": setting, "error": error})
                        continue
                    rel, us = run(loads, weights[kind], rows, setting)
                    tries.append({"setting": setting, "rel": rel, "us": round(us, 2) if rel < 1e-2 else None})
                timed = [t for t in tries if t.get("us")]
                best = min(timed, key=lambda t: t["us"]) if timed else {"setting": None, "us": None}
                row[loads] = {"best": best["setting"], "best_us": best["us"], "timed": len(timed), "tries": tries}
            results.append(row)
            print(f"[tma] {rows} rows {kind}: cuBLAS {row['cublas_us']} µs, "
                  + ", ".join(f"{ld} {row[ld]['best_us']} µs {row[ld]['best']}" for ld in LOADS), flush=True)  # fmt: skip
    doc = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if DEVICE.startswith("cuda") else DEVICE,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "layers": LAYERS,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print("\n| rows | kind | MB | cuBLAS µs | pointer µs (setting) | descriptor µs (setting) |")
    print("|---|---|---|---|---|---|")
    for row in results:
        n, k = shapes[row["kind"]]
        print(f"| {row['rows']} | {row['kind']} | {n * k * 2 / 1e6:.1f} | {row['cublas_us']} | "
              + " | ".join(f"{row[ld]['best_us']} ({row[ld]['best']})" for ld in LOADS) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
