# ruff: noqa: N803, N806  (Triton's convention: upper-case sizes and compile-time constants)
"""What a kernel boundary costs against a barrier inside one persistent kernel, on a GPU.

The fused decoder runs 900 kernels a call at batch 1, each 6-11 µs, bound by the latency of one warp per
scheduler (docs/BENCHMARKS.md). One persistent kernel per call (programs that stay resident and pass from one
layer's work to the next through a grid-wide barrier) is the way left to fewer, longer-lived programs. Before
building it, this measures the two things it trades:

- ``empty``: a CUDA graph of many launches of a kernel that does nothing but store, against one launch that
  passes as many grid-wide barriers: µs per launch against µs per barrier;
- ``product``: the decoder's products at batch 1 (51 rows, padded to 64) over 18 layers' weights, each
  layer's input the previous layer's output (its columns repeated where the product is wider than it is
  long), as a graph of 18 launches of a plain Triton product against one persistent launch whose programs
  take the same tiles layer after layer with a barrier in between: µs per layer. Both outputs must be equal
  (the same arithmetic in the same order; a barrier that let a layer start early would read unfinished
  rows), else the row is void;
- the same with the next layer's weights asked for ahead (``aAHEAD_K`` in ``--products``): each program
  loads the first AHEAD_K columns of its next weight tile into registers after it arrives at the barrier
  and before it waits there (weights do not depend on the previous layer, so those loads can overlap the
  wait). Its first product adds those columns in one step, another order of the same sums, so its outputs
  must match within rounding.

The persistent launches' counter is zeroed before each (a memset in the graph), whose time alone is
subtracted. A barrier polls the counter at most ``--spin-limit`` times and then gives up, recording it: a
machine where the programs are not all resident at once (another process holding multiprocessors, an MPS
share) reports "barrier gave up" after one untimed launch, and that case is not timed.

    source benchmarks/gpu_env.sh && python -m benchmarks.persistent_probe --out $OUT/persistent-probe.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from vlaserve.model.kernels import _fence, _fence_and_gather  # _fence: everywhere but in Triton's interpreter
from vlaserve.model.parity import compare

DEVICE = os.environ.get("VLASERVE_BENCH_DEVICE", "cuda:0")  # "cpu" only for a check in Triton's interpreter
LAYERS = 18


@triton.jit
def _arrive(count_ptr, target, FENCE: tl.constexpr):
    """Count this program in at ``count_ptr`` after each thread's earlier stores are fenced GPU-wide (as before
    the split kernels' arrival count, vlaserve.model.kernels); the count it saw, itself included."""
    _fence_and_gather(target, FENCE)
    return tl.atomic_add(count_ptr, 1, sem="acq_rel") + 1


@triton.jit
def _wait(count_ptr, seen, target, SPIN_LIMIT: tl.constexpr):
    """Wait until ``target`` programs have been counted at ``count_ptr``, polling at most SPIN_LIMIT times; 1 if
    they were, 0 if it gave up."""
    spins = tl.full([], 0, tl.int32)
    while (seen < target) & (spins < SPIN_LIMIT):
        seen = tl.atomic_add(count_ptr, 0, sem="acquire")
        spins += 1
    tl.debug_barrier()
    return (seen >= target).to(tl.int32)


@triton.jit
def _grid_barrier(count_ptr, target, FENCE: tl.constexpr, SPIN_LIMIT: tl.constexpr):
    """A grid-wide barrier: :func:`_arrive`, then :func:`_wait` for ``target`` programs; 1 if they came."""
    return _wait(count_ptr, _arrive(count_ptr, target, FENCE), target, SPIN_LIMIT)


@triton.jit
def _empty_kernel(out_ptr):
    tl.store(out_ptr + tl.program_id(0), tl.program_id(0))


@triton.jit
def _barriers_kernel(out_ptr, count_ptr, gave_up_ptr, PHASES: tl.constexpr, FENCE: tl.constexpr,
                     SPIN_LIMIT: tl.constexpr):  # fmt: skip
    pid, programs = tl.program_id(0), tl.num_programs(0)
    gave_up = tl.full([], 0, tl.int32)
    for phase in range(PHASES):
        tl.store(out_ptr + pid, phase)
        gave_up += 1 - _grid_barrier(count_ptr, (phase + 1) * programs, FENCE, SPIN_LIMIT)
    tl.store(gave_up_ptr + pid, gave_up)


@triton.jit
def _product_tile(acts_ptr, w_ptr, layer, tile, N, K: tl.constexpr, S: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Layer ``layer``'s product over the tile's columns: acts[layer + 1][:, cols] = a @ w[layer][cols]^T, a being
    acts[layer]'s first K columns (the input, for layer 0) or its N columns repeated to K (acts [LAYERS + 1,
    BLOCK_M, S], S = max(N, K); w [LAYERS, N, K]). Read past L1, which other programs' stores do not reach."""
    rows = tl.arange(0, BLOCK_M)
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    width = tl.where(layer == 0, K, N)
    src = acts_ptr + layer * BLOCK_M * S
    w = w_ptr + layer * N * K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(src + rows[:, None] * S + (ks % width)[None, :], cache_modifier=".cg")
        acc += tl.dot(a, tl.trans(tl.load(w + cols[:, None] * K + ks[None, :])))
    dst = acts_ptr + (layer + 1) * BLOCK_M * S + rows[:, None] * S + cols[None, :]
    tl.store(dst, acc.to(acts_ptr.dtype.element_ty))


@triton.jit
def _product_kernel(acts_ptr, w_ptr, layer, N, K: tl.constexpr, S: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    _product_tile(acts_ptr, w_ptr, layer, tl.program_id(0), N, K, S, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _persistent_products_kernel(acts_ptr, w_ptr, count_ptr, gave_up_ptr, N, K: tl.constexpr, S: tl.constexpr,
                                LAYERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr, FENCE: tl.constexpr, SPIN_LIMIT: tl.constexpr):  # fmt: skip
    """Every layer's product in turn (:func:`_product_tile`), each program taking tiles pid, pid + programs,
    ... of a layer, then waiting at a grid-wide barrier for the others before the next layer reads them."""
    pid, programs = tl.program_id(0), tl.num_programs(0)
    gave_up = tl.full([], 0, tl.int32)
    for layer in range(LAYERS):
        for tile in range(pid, N // BLOCK_N, programs):
            _product_tile(acts_ptr, w_ptr, layer, tile, N, K, S, BLOCK_M, BLOCK_N, BLOCK_K)
        gave_up += 1 - _grid_barrier(count_ptr, (layer + 1) * programs, FENCE, SPIN_LIMIT)
    tl.store(gave_up_ptr + pid, gave_up)


@triton.jit
def _persistent_ahead_kernel(acts_ptr, w_ptr, count_ptr, gave_up_ptr, N, K: tl.constexpr, S: tl.constexpr,
                             LAYERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             AHEAD_K: tl.constexpr, FENCE: tl.constexpr, SPIN_LIMIT: tl.constexpr):  # fmt: skip
    """What :func:`_persistent_products_kernel` computes, one tile per program, with the first AHEAD_K columns
    of the next layer's weight tile loaded into registers between arriving at the barrier and waiting there:
    the weights do not depend on the previous layer, so their loads can be in flight while the program waits
    for the others. (Loaded before the arrival's fence, which waits for every earlier load, they could not.)"""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ahead_ks = tl.arange(0, AHEAD_K)
    ahead = tl.load(w_ptr + cols[:, None] * K + ahead_ks[None, :])
    gave_up = tl.full([], 0, tl.int32)
    for layer in range(LAYERS):
        width = tl.where(layer == 0, K, N)
        src = acts_ptr + layer * BLOCK_M * S
        w = w_ptr + layer * N * K
        first = tl.load(src + rows[:, None] * S + (ahead_ks % width)[None, :], cache_modifier=".cg")
        acc = tl.dot(first, tl.trans(ahead))
        for k0 in range(AHEAD_K, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(src + rows[:, None] * S + (ks % width)[None, :], cache_modifier=".cg")
            acc += tl.dot(a, tl.trans(tl.load(w + cols[:, None] * K + ks[None, :])))
        dst = acts_ptr + (layer + 1) * BLOCK_M * S + rows[:, None] * S + cols[None, :]
        tl.store(dst, acc.to(acts_ptr.dtype.element_ty))
        seen = _arrive(count_ptr, (layer + 1) * programs, FENCE)
        ahead = tl.load(w_ptr + ((layer + 1) % LAYERS) * N * K + cols[:, None] * K + ahead_ks[None, :])
        gave_up += 1 - _wait(count_ptr, seen, (layer + 1) * programs, SPIN_LIMIT)
    tl.store(gave_up_ptr + pid, gave_up)


def empty_case(programs: int, phases: int, spin_limit: int, timed: bool) -> dict:
    """µs per launch of a do-nothing kernel (a graph of ``phases`` launches) and per grid-wide barrier (one
    launch passing ``phases`` of them), each over ``programs`` programs."""
    out = torch.zeros(programs, dtype=torch.int32, device=DEVICE)
    count = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    gave_up = torch.zeros(programs, dtype=torch.int32, device=DEVICE)

    def launches():
        for _ in range(phases):
            _empty_kernel[(programs,)](out)

    def barriers():
        count.zero_()
        _barriers_kernel[(programs,)](out, count, gave_up, PHASES=phases, FENCE=_fence(), SPIN_LIMIT=spin_limit)

    row = {"programs": programs, "phases": phases}
    barriers()
    row["gave_up"] = int(gave_up.sum())
    if timed and not row["gave_up"]:
        row["launch_us"] = round(1e3 * graph_ms(launches) / phases, 3)
        row["barrier_us"] = round(1e3 * (graph_ms(barriers) - graph_ms(count.zero_)) / phases, 3)
        row["gave_up"] = int(gave_up.sum())
    return row


def product_case(n: int, k: int, block_n: int, block_k: int, warps: int, stages: int, rows: int, programs: int,
                 spin_limit: int, timed: bool, dtype=torch.bfloat16, ahead_k: int = 0) -> dict:  # fmt: skip
    """µs per layer of the batch-1 product [rows, k] @ [n, k]^T over LAYERS layers' weights: a graph of one
    launch per layer (n / block_n programs) against one persistent launch (``programs`` programs, 0 = as many
    as tiles; with ``ahead_k``, one program per tile, the next layer's first ``ahead_k`` weight columns loaded
    between arriving at each barrier and waiting there)."""
    if ahead_k and (ahead_k % block_k or not block_k <= ahead_k <= k or ahead_k & (ahead_k - 1)):
        raise ValueError(f"ahead_k {ahead_k}: a power of two, a multiple of BLOCK_K {block_k}, at most K {k}")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    s = max(n, k)
    acts_launches = torch.zeros((LAYERS + 1, 64, s), dtype=dtype, device=DEVICE)
    acts_launches[0, :rows, :k] = torch.randn((rows, k), generator=gen, device=DEVICE).to(dtype)
    acts_persistent = acts_launches.clone()
    w = (torch.randn((LAYERS, n, k), generator=gen, device=DEVICE) / k**0.5).to(dtype)
    count = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    tiles = n // block_n
    programs = tiles if ahead_k or not programs else programs
    gave_up = torch.zeros(programs, dtype=torch.int32, device=DEVICE)
    options = {"S": s, "BLOCK_M": 64, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages}

    def launches():
        for layer in range(LAYERS):
            _product_kernel[(tiles,)](acts_launches, w, layer, n, K=k, **options)

    def persistent():
        count.zero_()
        if ahead_k:
            _persistent_ahead_kernel[(tiles,)](
                acts_persistent, w, count, gave_up, n, K=k, LAYERS=LAYERS, AHEAD_K=ahead_k, FENCE=_fence(),
                SPIN_LIMIT=spin_limit, **options,
            )  # fmt: skip
            return
        _persistent_products_kernel[(programs,)](
            acts_persistent, w, count, gave_up, n, K=k, LAYERS=LAYERS, FENCE=_fence(), SPIN_LIMIT=spin_limit, **options
        )  # fmt: skip

    launches()
    persistent()
    last = acts_launches[-1, :rows, :n].float()
    row = {"n": n, "k": k, "setting": [block_n, block_k, warps, stages], "ahead_k": ahead_k, "tiles": tiles, "programs": programs,
           "equal": same(acts_launches, acts_persistent, ahead_k), "gave_up": int(gave_up.sum()),
           "last_layer_rms": round(float(last.square().mean().sqrt()), 4)}  # fmt: skip
    if timed and not row["gave_up"]:
        row["launches_us_per_layer"] = round(1e3 * graph_ms(launches) / LAYERS, 3)
        row["persistent_us_per_layer"] = round(1e3 * (graph_ms(persistent) - graph_ms(count.zero_)) / LAYERS, 3)
        row["gave_up"] = int(gave_up.sum())
        row["equal"] = row["equal"] and same(acts_launches, acts_persistent, ahead_k)
    return row


def same(launched: torch.Tensor, persistent: torch.Tensor, ahead_k: int) -> bool:
    """Whether the persistent outputs are the launched ones: bit for bit, or with ``ahead_k`` (whose first product
    adds AHEAD_K columns in one dot, another order of the same sums) within rounding (rel 1e-2)."""
    if not ahead_k:
        return bool(torch.equal(launched, persistent))
    return compare(persistent.float(), launched.float())["rel"] < 1e-2


def graph_ms(run) -> float:
    """Median ms of a CUDA graph of ``run`` (captured after one eager call)."""
    from benchmarks.profile_runtime import replay_ms

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    return replay_ms(graph.replay, 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=0, help="programs of the empty case (0: the GPU's SMs)")
    parser.add_argument("--phases", type=int, default=180, help="launches / barriers in the empty case")
    parser.add_argument(
        "--products", default="8192x1024:64x64w4s4,2560x1024:32x64w4s4,1024x2048:16x128w4s4",
        help="NxK:BNxBKwWARPSsSTAGES[aAHEAD_K] per product (the decoder's gate/up, q/k/v, output projection); "
        "aAHEAD_K: persistent with that many of the next layer's weight columns loaded at each barrier, between "
        "arriving and waiting",
    )  # fmt: skip
    parser.add_argument("--spin-limit", type=int, default=10_000, help="polls of a barrier before it gives up")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    timed = DEVICE.startswith("cuda")
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count if timed else 1
    result = {
        "date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(DEVICE) if timed else "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "sms": sms,
        "empty": empty_case(args.programs or sms, args.phases, args.spin_limit, timed), "products": [],
    }  # fmt: skip
    print(f"[persistent] empty: {result['empty']}", flush=True)
    for item in args.products.split(","):
        shape, setting = item.split(":")
        n, k = (int(v) for v in shape.split("x"))
        bn_bk, rest = setting.split("w")
        bn, bk = (int(v) for v in bn_bk.split("x"))
        rest, _, ahead = rest.partition("a")
        warps, stages = (int(v) for v in rest.split("s"))
        try:
            row = product_case(n, k, bn, bk, warps, stages, 51, 0, args.spin_limit, timed, ahead_k=int(ahead or 0))
        except triton.runtime.errors.OutOfResources as exc:  # e.g. a tile ahead whose dot needs too much shared memory
            row = {"n": n, "k": k, "setting": [bn, bk, warps, stages], "ahead_k": int(ahead or 0), "error": str(exc)}
        result["products"].append(row)
        print(f"[persistent] product: {result['products'][-1]}", flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2))
    e = result["empty"]
    print(f"\nempty, {e['programs']} programs: {e.get('launch_us')} µs a launch, {e.get('barrier_us')} µs a barrier"
          f"{'  (a barrier gave up: void)' if e['gave_up'] else ''}")  # fmt: skip
    for r in result["products"]:
        if "error" in r:
            print(f"product {r['n']}x{r['k']} {r['setting']}, {r['ahead_k']} columns ahead: {r['error']}")
            continue
        void = "" if r["equal"] and not r["gave_up"] else "  VOID (outputs differ or a barrier gave up)"
        ahead = f", {r['ahead_k']} columns ahead" if r["ahead_k"] else ""
        print(f"product {r['n']}x{r['k']} {r['setting']}{ahead}, {r['tiles']} tiles: {r.get('launches_us_per_layer')} µs "
              f"a layer as launches, {r.get('persistent_us_per_layer')} persistent{void}")  # fmt: skip


if __name__ == "__main__":
    main()
