# ruff: noqa: N803, N806  (Triton's convention: upper-case sizes and compile-time constants)
"""The decoder's chained products with each program's weights streamed into shared memory ahead, on a GPU.

At batch 1 each of the decoder's product kernels takes 6-9 µs where streaming its weights at the memory's speed
would take 1-4 (docs/BENCHMARKS.md): each starts from nothing, waits on its first loads, and ends before the
next begins. A persistent kernel cannot start a layer's products before the layer before it is done (they read
its output), but it can fetch the layer's weights before then, since those depend on nothing. This measures
what that is worth, on the same chain of products as ``benchmarks/persistent_probe.py`` (the decoder's
products at batch 1, 51 rows padded to 64, over 18 layers' weights, each layer reading the previous one's
output), written in Gluon (Triton's lower-level language, with explicit shared memory and asynchronous
copies) so that the copies can be placed by hand:

- each program keeps a ring of STAGES weight tiles in shared memory, filled by the copy engine (TMA) through
  one stream that runs across layers: while a layer's last tiles are multiplied, the next layer's first ones
  are already on their way, and they keep coming while the program waits at the grid-wide barrier;
- a layer's activations (the previous layer's output, written by every program) are copied into shared
  memory asynchronously after the barrier, A_STAGES tiles ahead of the products;
- the products are warp-group MMAs (wgmma) from shared memory; with ``q`` each is queued while the next tile
  is awaited;
- with ``kSPLITS`` the inner size K is split over that many programs, each adding its share to float32 outputs
  with atomic additions (so that a narrow product still has a program on most multiprocessors, each reading
  a smaller share of the activations), which the next layer converts to bf16 as it copies them in.

Three forms of the same chain, each a CUDA graph, in µs per layer:

- ``triton``: one launch of persistent_probe's plain Triton product per layer (the decoder's kernels' way);
- ``gluon``: one launch of this kernel per layer (LAYERS = 1: its pipeline inside a layer, no streaming
  across layers);
- ``stream``: one persistent launch of this kernel over all layers, a grid-wide barrier between them.

Every form's activations (all layers') must match the ``triton`` form's within rounding (rel 1e-2) on a first
run from zeroed outputs, where a barrier that let a layer start early would read zeros, and again after the
timed replays, else the row is void. The Gluon forms' graphs include their memsets (the barrier's count, and
the float32 sums when K is split); nothing is subtracted. A barrier
polls at most ``--spin-limit`` times and then gives up, which voids the row too (programs not all resident).
Each setting runs in a process of its own. ``--decoder`` also times the served decoder's own kernels for the
four products (each with its norm or epilogue) and cuBLAS, the same way, for the comparison that counts.

    source benchmarks/gpu_env.sh && python -m benchmarks.stream_probe --decoder --out $OUT/stream-probe.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    async_copy,
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from benchmarks.persistent_probe import LAYERS, _product_kernel, graph_ms
from vlaserve.model.parity import compare

DEVICE = os.environ.get("VLASERVE_BENCH_DEVICE", "cuda:0")  # a GPU: Gluon has no CPU interpreter
FORMS = ("triton", "gluon", "stream")
BLOCK_M = 64  # the batch's 51 rows, padded to one warp group's MMA rows
ROWS = 51
# N x K : BLOCK_N x BLOCK_K, STAGES weight tiles in the ring, A_STAGES activation tiles ahead, warps, [K split
# over SPLITS programs], [q: each product queued while the next tile is awaited]. The defaults: the fastest
# right setting of each of the decoder's products on the H200 (docs/BENCHMARKS.md, 2026-12-04).
DEFAULT_PRODUCTS = (
    "8192x1024:64x128s6a6w4",  # gate/up: 128 programs
    "2560x1024:32x128s8a4w4q",  # q/k/v: 80 programs
    "1024x2048:64x128s4a2w4k8",  # output projection: 16 column tiles x 8 splits of K
    "1024x4096:32x128s4a4w4k4q",  # down projection: 32 x 4
)

# persistent_probe's settings of the plain Triton product, per shape: BLOCK_N, BLOCK_K, warps, stages
TRITON_SETTINGS = {
    (8192, 1024): (64, 64, 4, 4), (2560, 1024): (32, 64, 4, 4), (1024, 2048): (16, 128, 4, 4),
    (1024, 4096): (16, 128, 4, 4),
}  # fmt: skip


@gluon.jit
def _arrive(count_ptr):
    """Count this program in at ``count_ptr`` once every thread's stores are visible GPU-wide."""
    gl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, $1;", "=r,r", [gl.to_tensor(0)], dtype=gl.int32,
                              is_pure=False, pack=1)  # fmt: skip
    gl.thread_barrier()
    gl.atomic_add(count_ptr, 1, sem="acq_rel")


@gluon.jit
def _wait(count_ptr, target, SPIN_LIMIT: gl.constexpr):
    """Wait until ``target`` programs have been counted at ``count_ptr``, polling at most SPIN_LIMIT times; 1 if
    it gave up."""
    seen = gl.atomic_add(count_ptr, 0, sem="acquire")
    spins = 0
    while (seen < target) & (spins < SPIN_LIMIT):
        seen = gl.atomic_add(count_ptr, 0, sem="acquire")
        spins += 1
    gl.thread_barrier()
    return (seen < target).to(gl.int32)


@gluon.jit
def _issue_weights(w_desc, w_bufs, w_bars, j, first_layer, off_n, k_base, N, KT: gl.constexpr,
                   BLOCK_K: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """The copy engine asked for this program's j-th weight tile of the stream (layer first_layer + j // KT,
    columns k_base + (j % KT) * BLOCK_K), into ring slot j % STAGES."""
    slot = j % STAGES
    mbarrier.expect(w_bars.index(slot), w_desc.block_type.nbytes)
    row = (first_layer + j // KT) * N + off_n
    tma.async_copy_global_to_shared(w_desc, [row, k_base + (j % KT) * BLOCK_K], w_bars.index(slot),
                                    w_bufs.index(slot))  # fmt: skip


@gluon.jit
def _issue_acts(a_bufs, src, kk, rows, cols, width, k_base, S: gl.constexpr, KT: gl.constexpr,
                BLOCK_K: gl.constexpr, A_STAGES: gl.constexpr, VEC: gl.constexpr):  # fmt: skip
    """Activation tile kk of this program's share of a layer's K copied asynchronously into ring slot
    kk % A_STAGES (nothing copied past the share's last tile, but a group committed all the same, so that every
    wait counts the same groups)."""
    # width (K or N) is a multiple of BLOCK_K, so each row's BLOCK_K columns stay contiguous after the wrap
    ks = gl.max_contiguous(gl.multiple_of((k_base + kk * BLOCK_K + cols) % width, VEC), VEC)
    ptrs = src + rows[:, None] * S + ks[None, :]
    mask = (rows[:, None] >= 0) & (kk < KT)
    async_copy.async_copy_global_to_shared(a_bufs.index(kk % A_STAGES), ptrs, mask=mask, cache_modifier=".cg")
    async_copy.commit_group()


@gluon.jit
def _refill(w_desc, w_bufs, w_bars, a_bufs, src, r, j, first_layer, off_n, k_base, rows, cols, width, N,
            S: gl.constexpr, KT: gl.constexpr, TOTAL: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
            A_STAGES: gl.constexpr, VEC: gl.constexpr):  # fmt: skip
    """Once tile r of the layer (stream tile j) is no longer read: its weight slot asked for stream tile
    j + STAGES (the next layer's, near a layer's end), its activation slot for tile r + A_STAGES."""
    gl.thread_barrier()  # every warp is past the reads of these slots
    if j + STAGES < TOTAL:
        _issue_weights(w_desc, w_bufs, w_bars, j + STAGES, first_layer, off_n, k_base, N, KT, BLOCK_K, STAGES)
    _issue_acts(a_bufs, src, r + A_STAGES, rows, cols, width, k_base, S, KT, BLOCK_K, A_STAGES, VEC)


@gluon.jit
def _stream_kernel(acts_ptr, acts32_ptr, w_desc, count_ptr, gave_up_ptr, first_layer, N, K: gl.constexpr,
                   S: gl.constexpr, LAYERS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                   STAGES: gl.constexpr, A_STAGES: gl.constexpr, SPLITS: gl.constexpr, ASYNC: gl.constexpr,
                   ROWS: gl.constexpr, SPIN_LIMIT: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """LAYERS chained products from layer ``first_layer``: out[l + 1][:, cols] = a @ w[l][cols]^T, a being
    out[l]'s first K columns (the input, for layer 0) or its N columns repeated to K (w as [layers * N, K]
    behind ``w_desc``), with a grid-wide barrier between layers. Program pid takes columns
    (pid % (N / BLOCK_N)) * BLOCK_N ... + BLOCK_N and K's share pid // (N / BLOCK_N) of SPLITS.

    SPLITS 1: ``out`` is ``acts_ptr`` (bf16 [LAYERS + 1, 64, S], S = max(N, K)), its tiles copied straight into
    the products' shared memory. SPLITS > 1: ``out`` is ``acts32_ptr`` (fp32, same shape, zero past layer 0),
    each program adding its share with atomic additions; its tiles are copied into shared memory as they are,
    then converted to bf16 for the products. ASYNC: each product runs while the next tile is awaited (one in
    flight), and its slots are given back one tile later."""
    BM: gl.constexpr = 64
    KS: gl.constexpr = K // SPLITS
    KT: gl.constexpr = KS // BLOCK_K
    TOTAL: gl.constexpr = LAYERS * KT
    A_WAIT: gl.constexpr = A_STAGES - 1 - ASYNC
    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    n_tiles = N // BLOCK_N
    off_n = (pid % n_tiles) * BLOCK_N
    k_base = (pid // n_tiles) * KS

    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    w_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(w_bars.index(s), count=1)
    # the weight stream starts at once: nothing it reads depends on another program
    for s in gl.static_range(STAGES):
        if s < TOTAL:
            _issue_weights(w_desc, w_bufs, w_bars, s, first_layer, off_n, k_base, N, KT, BLOCK_K, STAGES)

    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                         instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    mma_shared: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BLOCK_K], gl.bfloat16)
    VEC: gl.constexpr = 8 if SPLITS == 1 else 4  # 16 bytes a copy: bf16 activations, or fp32 when K is split
    TPW_K: gl.constexpr = BLOCK_K // VEC if BLOCK_K // VEC < 32 else 32
    load_layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TPW_K, TPW_K], [num_warps, 1], [1, 0])
    if SPLITS == 1:
        a_bufs = gl.allocate_shared_memory(gl.bfloat16, [A_STAGES, BM, BLOCK_K], mma_shared)
        out_ptr = acts_ptr
    else:
        plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        a_bufs = gl.allocate_shared_memory(gl.float32, [A_STAGES, BM, BLOCK_K], plain)
        a_bf = gl.allocate_shared_memory(gl.bfloat16, [2, BM, BLOCK_K], mma_shared)
        out_ptr = acts32_ptr
    rows = gl.arange(0, BM, layout=gl.SliceLayout(1, load_layout))
    cols = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, load_layout))
    out_rows = gl.arange(0, BM, layout=gl.SliceLayout(1, mma_layout))
    out_cols = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma_layout))

    gave_up = 0
    for step in range(LAYERS):
        layer = first_layer + step
        if step > 0:  # the previous layer's output is read below: every program must have written its part
            gave_up += _wait(count_ptr, step * programs, SPIN_LIMIT)
        width = gl.where(layer == 0, K, N)
        src = out_ptr + layer * BM * S
        for kk in gl.static_range(A_STAGES):
            _issue_acts(a_bufs, src, kk, rows, cols, width, k_base, S, KT, BLOCK_K, A_STAGES, VEC)
        acc = gl.zeros([BM, BLOCK_N], gl.float32, layout=mma_layout)
        for kk in range(KT):
            j = step * KT + kk
            async_copy.wait_group(A_WAIT)
            if SPLITS == 1:
                fence_async_shared()
                gl.thread_barrier()
                a = a_bufs.index(kk % A_STAGES)
            else:
                gl.thread_barrier()
                a = a_bf.index(kk % 2)
                a.store(a_bufs.index(kk % A_STAGES).load(load_layout).to(gl.bfloat16))
                fence_async_shared()
                gl.thread_barrier()
            mbarrier.wait(w_bars.index(j % STAGES), (j // STAGES) & 1)
            w = w_bufs.index(j % STAGES).permute((1, 0))
            if ASYNC:
                acc = warpgroup_mma(a, w, acc, is_async=True)
                acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
                if kk > 0:
                    _refill(w_desc, w_bufs, w_bars, a_bufs, src, kk - 1, j - 1, first_layer, off_n, k_base, rows,
                            cols, width, N, S, KT, TOTAL, BLOCK_K, STAGES, A_STAGES, VEC)  # fmt: skip
            else:
                acc = warpgroup_mma(a, w, acc)
                _refill(w_desc, w_bufs, w_bars, a_bufs, src, kk, j, first_layer, off_n, k_base, rows, cols, width,
                        N, S, KT, TOTAL, BLOCK_K, STAGES, A_STAGES, VEC)  # fmt: skip
        if ASYNC:
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
            _refill(w_desc, w_bufs, w_bars, a_bufs, src, KT - 1, step * KT + KT - 1, first_layer, off_n, k_base, rows,
                    cols, width, N, S, KT, TOTAL, BLOCK_K, STAGES, A_STAGES, VEC)  # fmt: skip
        async_copy.wait_group(0)
        dst = out_ptr + (layer + 1) * BM * S + out_rows[:, None] * S + out_cols[None, :]
        if SPLITS == 1:
            gl.store(dst, acc.to(gl.bfloat16))
        else:
            gl.atomic_add(dst, acc, mask=out_rows[:, None] < ROWS, sem="relaxed")
        if step + 1 < LAYERS:
            _arrive(count_ptr)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(w_bars.index(s))
    gl.atomic_add(gave_up_ptr + pid, gave_up)  # added up over every launch, so a timed replay's give-up shows


SETTING = re.compile(r"(\d+)x(\d+):(\d+)x(\d+)s(\d+)a(\d+)w(\d+)(?:k(\d+))?(q?)")


def parse_product(item: str) -> dict:
    """``NxK:BNxBKsSTAGESaA_STAGESwWARPS[kSPLITS][q]`` (see DEFAULT_PRODUCTS) as its numbers."""
    match = SETTING.fullmatch(item.strip())
    if not match:
        raise ValueError(f"{item!r}: expected NxK:BNxBKsSTAGESaA_STAGESwWARPS[kSPLITS][q], e.g. 8192x1024:64x64s8a16w4")
    n, k, block_n, block_k, stages, a_stages, warps = (int(v) for v in match.groups()[:7])
    row = {"n": n, "k": k, "block_n": block_n, "block_k": block_k, "stages": stages, "a_stages": a_stages,
           "warps": warps, "splits": int(match[8] or 1), "async": match[9] == "q"}  # fmt: skip
    if n % block_n or k % (row["splits"] * block_k):
        raise ValueError(f"{item}: BLOCK_N must divide N, and SPLITS x BLOCK_K must divide K")
    if block_n > 256 or block_n % 8 or min(stages, a_stages) < 1 + row["async"]:
        # with q a tile's slots are given back one tile late: with one slot the next tile would never be asked for
        raise ValueError(f"{item}: BLOCK_N a multiple of 8 up to 256; STAGES and A_STAGES at least 2 with q, else 1")
    return row


def shared_bytes(p: dict) -> int:
    """Shared memory a program of this setting holds: the weight ring and the activation ring (fp32 when K is
    split, with two bf16 tiles for the products)."""
    acts = p["a_stages"] * BLOCK_M * p["block_k"] * (2 if p["splits"] == 1 else 4)
    return 2 * p["stages"] * p["block_n"] * p["block_k"] + acts + (p["splits"] > 1) * 2 * 2 * BLOCK_M * p["block_k"]


def product_case(p: dict, spin_limit: int) -> dict:
    """µs per layer of the chain as ``triton`` launches, ``gluon`` launches and one ``stream`` launch."""
    n, k, block_n, block_k, splits = p["n"], p["k"], p["block_n"], p["block_k"], p["splits"]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    s = max(n, k)
    acts = {f: torch.zeros((LAYERS + 1, BLOCK_M, s), dtype=torch.bfloat16, device=DEVICE) for f in FORMS}
    acts["triton"][0, :ROWS, :k] = torch.randn((ROWS, k), generator=gen, device=DEVICE).to(torch.bfloat16)
    for f in FORMS[1:]:
        acts[f].copy_(acts["triton"])
    acts32 = {f: acts[f].float() for f in FORMS[1:]}  # the split forms' outputs; zeroed past layer 0 each run
    w = (torch.randn((LAYERS, n, k), generator=gen, device=DEVICE) / k**0.5).to(torch.bfloat16)
    layout = gl.NVMMASharedLayout.get_default_for([block_n, block_k], gl.bfloat16)
    w_desc = TensorDescriptor.from_tensor(w.view(LAYERS * n, k), [block_n, block_k], layout)
    programs = n // block_n * splits
    count = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    gave_up = torch.zeros(programs, dtype=torch.int32, device=DEVICE)
    triton_setting = TRITON_SETTINGS.get((n, k), (16, 128, 4, 4))
    t_bn, t_bk, t_warps, t_stages = triton_setting
    common = {"K": k, "S": s, "BLOCK_N": block_n, "BLOCK_K": block_k, "STAGES": p["stages"],
              "A_STAGES": p["a_stages"], "SPLITS": splits, "ASYNC": p["async"], "ROWS": ROWS,
              "SPIN_LIMIT": spin_limit, "num_warps": p["warps"]}  # fmt: skip

    def zero(form: str):  # before each run of a Gluon form: the barrier's count and, split, the sums it adds to
        count.zero_()
        if splits > 1:
            acts32[form][1:].zero_()

    def run_triton():
        for layer in range(LAYERS):
            _product_kernel[(n // t_bn,)](acts["triton"], w, layer, n, K=k, S=s, BLOCK_M=BLOCK_M, BLOCK_N=t_bn,
                                          BLOCK_K=t_bk, num_warps=t_warps, num_stages=t_stages)  # fmt: skip

    def run_gluon():
        zero("gluon")
        for layer in range(LAYERS):
            _stream_kernel[(programs,)](acts["gluon"], acts32["gluon"], w_desc, count, gave_up, layer, n, LAYERS=1,
                                        **common)  # fmt: skip

    def run_stream():
        zero("stream")
        _stream_kernel[(programs,)](acts["stream"], acts32["stream"], w_desc, count, gave_up, 0, n, LAYERS=LAYERS,
                                    **common)  # fmt: skip

    def outputs(f: str) -> torch.Tensor:
        return (acts[f] if f == "triton" or splits == 1 else acts32[f]).float()

    def check() -> dict:
        return {
            "rel": {f: compare(outputs(f), outputs("triton"))["rel"] for f in FORMS[1:]},
            "last_rms": {f: round(float(outputs(f)[-1, :ROWS, :n].square().mean().sqrt()), 4) for f in FORMS},
        }

    def passes(c: dict) -> bool:  # within rounding of the Triton chain, which has not faded to nothing
        return all(r < 1e-2 for r in c["rel"].values()) and min(c["last_rms"].values()) > 0.1

    runs = {"triton": run_triton, "gluon": run_gluon, "stream": run_stream}
    row = {**p, "programs": programs, "shared_kb": round(shared_bytes(p) / 1024, 1),
           "weights_mb_per_layer": round(n * k * 2 / 1e6, 2), "triton_setting": list(triton_setting)}  # fmt: skip
    try:
        for run in runs.values():
            run()
        torch.cuda.synchronize()
    except triton.runtime.errors.OutOfResources as exc:
        return {**row, "error": str(exc)}
    # the verdict is this first check's: every output past layer 0 started from zero, so a layer that read its
    # input before it was written reads zeros. (Replayed, the bf16 outputs keep the previous replay's values,
    # which a too-early read would find right.)
    row.update(check())
    row["gave_up"] = int(gave_up.sum())
    if not row["gave_up"]:
        # each Gluon form's graph includes its memsets (the barrier's count; with K split, the sums)
        row["us_per_layer"] = {f: round(1e3 * graph_ms(run) / LAYERS, 3) for f, run in runs.items()}
        row["after_timing"] = check()
        row["gave_up"] = int(gave_up.sum())
    # right: no barrier ever gave up, the outputs were right at first and still are after the timed replays
    row["right"] = not row["gave_up"] and passes(row) and passes(row.get("after_timing", row))
    return row


def decoder_kinds() -> dict:
    """The served decoder's own kernels for the four products at batch 1 (pi0, random weights), timed the same
    way (a CUDA graph of one launch per layer, the default launch settings; each with its norm or epilogue:
    RoPE, residual, GeGLU, the next norm's sums of squares), and cuBLAS on the same shapes: µs per layer."""
    from benchmarks.decoder_kernels import Bench, cublas_us, products
    from vlaserve.model.parity import randomize_biases_and_norms
    from vlaserve.model.policy import build_policy
    from vlaserve.model.presets import get_preset

    policy = build_policy(get_preset("pi0", 2), seed=0, dtype=torch.bfloat16, device=DEVICE)
    randomize_biases_and_norms(policy, seed=0)
    bench = Bench(policy, 1)
    shapes = {kind: f"{n}x{k}" for kind, (_, n, k) in products(policy.cfg).items()}
    return {
        "shapes": shapes, "rows": bench.rows,
        "fused_us": {kind: round(bench.time_us(kind, bench.defaults), 3) for kind in shapes},
        "cublas_us": cublas_us(policy, bench.rows),
    }  # fmt: skip


def run_isolated(args: list[str], timeout_s: int, failed: dict) -> dict:
    """A child's row (this module with ``args``, its last line of output) from a process of its own: a kernel
    that faults or hangs loses that row only (``failed``, with the error)."""
    command = [sys.executable, "-m", "benchmarks.stream_probe", *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**failed, "error": f"no answer in {timeout_s} s"}
    lines = done.stdout.strip().splitlines()
    try:
        if done.returncode or not lines:
            raise ValueError("no row")
        return json.loads(lines[-1])
    except ValueError:
        return {**failed, "error": f"exit {done.returncode}: {(done.stderr or done.stdout).strip()[-600:]}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--products", default=",".join(DEFAULT_PRODUCTS),
        help="NxK:BNxBKsSTAGESaA_STAGESwWARPS[kSPLITS][q] per product: the weight tile, weight tiles in the ring, "
        "activation tiles ahead, warps, K split over SPLITS programs, q: products queued (default: the fastest "
        "right settings found for the decoder's gate/up, q/k/v, output and down projections)",
    )  # fmt: skip
    parser.add_argument("--spin-limit", type=int, default=100_000, help="polls of a barrier before it gives up")
    parser.add_argument("--timeout", type=int, default=180, help="seconds for one setting's process")
    parser.add_argument(
        "--decoder", action="store_true",
        help="also time the served decoder's own kernels and cuBLAS at the four shapes (pi0, batch 1)",
    )  # fmt: skip
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child's setting: its row as JSON on stdout
    parser.add_argument("--decoder-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(product_case(parse_product(args.one), args.spin_limit)))
        return
    if args.decoder_child:
        print(json.dumps(decoder_kinds()))
        return
    if not args.out:
        parser.error("--out is required")
    items = args.products.split(",")
    for item in items:  # every setting checked before any runs
        try:
            parse_product(item)
        except ValueError as exc:
            parser.error(f"--products: {exc}")
    result = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(DEVICE),
              "torch": torch.__version__, "triton": triton.__version__, "layers": LAYERS, "rows": ROWS,
              "products": []}  # fmt: skip
    if args.decoder:
        result["decoder"] = run_isolated(["--decoder-child"], 600, {})
        print(f"[stream] the decoder's kernels: {result['decoder']}", flush=True)
    for item in items:
        row = run_isolated(["--one", item, "--spin-limit", str(args.spin_limit)], args.timeout, parse_product(item))
        result["products"].append(row)
        print(f"[stream] {row}", flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print("\nproduct (setting): µs per layer as triton launches / gluon launches / one streaming launch (rel)")
    for r in result["products"]:
        setting = (f"{r['block_n']}x{r['block_k']} s{r['stages']} a{r['a_stages']} w{r['warps']} k{r['splits']}"
                   f"{' async' if r['async'] else ''}")  # fmt: skip
        if "error" in r:
            print(f"{r['n']}x{r['k']} ({setting}): {r['error'][-300:]}")
            continue
        us = r.get("us_per_layer", {})
        void = "" if r["right"] else "  VOID (outputs differ or a barrier gave up)"
        print(f"{r['n']}x{r['k']} ({setting}, {r['shared_kb']} KB), {r['weights_mb_per_layer']} MB a layer: "
              f"{us.get('triton')} / {us.get('gluon')} / {us.get('stream')} (rel {r['rel']}){void}")  # fmt: skip
    d = result.get("decoder", {})
    if "fused_us" in d:
        print("\nper kind, µs per layer: the decoder's own kernel / cuBLAS / the fastest right streaming launch")
        for kind, shape in d["shapes"].items():
            right = [r for r in result["products"] if r.get("right") and f"{r['n']}x{r['k']}" == shape]
            best = min((r["us_per_layer"]["stream"] for r in right if "us_per_layer" in r), default=None)
            print(f"{kind:6} {shape:>10}: {d['fused_us'][kind]} / {d['cublas_us'].get(kind)} / {best}")
    elif d:
        print(f"\nthe decoder's kernels: {d.get('error')}")


if __name__ == "__main__":
    main()
