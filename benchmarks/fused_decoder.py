"""The decoder with fused Triton kernels (vlaserve.model.kernels) against the served one, in-process on a GPU.

For each batch size: the decoder as the `gpu` variant serves it (each layer compiled by Inductor, one CUDA
graph per batch, the faster attention kept) and the fused decoder (five kernels per expert layer, one CUDA
graph), both from the same random pi0 weights. Each is timed as a graph replay, its kernels counted in one
profiled replay, and its actions compared with eager PyTorch's on the same inputs (relative L2 error;
over the bf16 parity tolerance, the row is marked wrong and its time does not count).

    python -m benchmarks.fused_decoder --batches 1,16 --out $OUT/fused-decoder.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import time
from pathlib import Path

import torch

from benchmarks.profile_runtime import kernel_times, replay_ms
from vlaserve.model.kernels import FusedDecoder
from vlaserve.model.parity import REL_TOLERANCE, compare, random_request
from vlaserve.model.policy import Decoder, build_policy
from vlaserve.model.presets import get_preset
from vlaserve.runtimes import CudaGraphs, compile_layers, compiled_attention_choices, sdpa_choices

DEVICE = "cuda:0"
# Launch options per kernel kind (vlaserve.model.kernels.TILES_BY_ROWS says what each number is; a fifth
# number splits the K of a product added to the residual stream). benchmarks/decoder_kernels.py sweeps each
# kind alone over a much wider grid; this is the whole decoder's view. The sweep runs set i = the i-th option
# of every kind, times each kind's kernels in a profiled replay, and keeps the fastest option per kind: the
# kinds are independent kernels, so the best ones combine.
OPTIONS = {
    "qkv": [(16, 64, 4, 6), (16, 128, 4, 6), (16, 128, 8, 4), (32, 64, 4, 4), (32, 128, 8, 4), (16, 256, 4, 4),
            (64, 64, 4, 3), (64, 128, 8, 4)],
    "attention": [(16, 128, 4, 2), (16, 64, 4, 3), (16, 32, 4, 3), (32, 64, 4, 3), (16, 64, 2, 3), (64, 32, 4, 3),
                  (16, 128, 4, 3), (16, 256, 8, 2)],
    "out": [(16, 128, 4, 5), (16, 128, 4, 4, 2), (16, 128, 4, 4, 4), (16, 64, 4, 4, 8), (32, 128, 4, 4, 4),
            (16, 256, 4, 3, 4), (32, 64, 4, 4, 8), (32, 128, 4, 4)],
    "geglu": [(32, 64, 4, 6), (32, 128, 4, 6), (32, 128, 8, 4), (64, 64, 4, 4), (64, 128, 8, 4), (16, 128, 4, 6),
              (32, 64, 8, 4), (64, 64, 4, 3)],
    "down": [(16, 128, 4, 5), (16, 128, 4, 4, 4), (16, 128, 4, 4, 8), (32, 128, 4, 4, 8), (16, 256, 4, 3, 4),
             (16, 64, 4, 4, 16), (32, 256, 4, 3, 4), (32, 128, 4, 4)],
}  # fmt: skip
KIND_OF_KERNEL = {
    "_norm_qkv_kernel": "qkv", "_attention_kernel": "attention",
    "_out_proj_kernel": "out", "_norm_geglu_kernel": "geglu", "_down_proj_kernel": "down",
    "_step_io_kernel": "step", "_action_time_kernel": "step", "_action_out_kernel": "step",
    "_merge_kernel": "attention",
}  # fmt: skip


def bf16_policy(args, tag: str):
    """The batch sizes of ``--batches``, the preset of ``--preset``/``--views``, and its seed-0 bf16 policy on
    the GPU (what this benchmark and the fp8 one measure against)."""
    batches = [int(b) for b in args.batches.split(",")]
    cfg = get_preset(args.preset, args.views)
    started = time.perf_counter()
    policy = build_policy(cfg, seed=0, dtype=torch.bfloat16, device=DEVICE)
    print(f"[{tag}] {cfg.name} policy built in {time.perf_counter() - started:.1f} s", flush=True)
    return batches, cfg, policy


def eager_cases(policy, batches) -> dict[int, tuple]:
    """Per batch size: a random request (seeded by the batch size) on the GPU, and eager PyTorch's prefix
    keys/values, prefix mask and actions for it. Made before anything is compiled: compiling patches the
    layers the policy shares."""
    cfg, cases = policy.cfg, {}
    for batch in batches:
        request = {k: v.to(DEVICE) for k, v in random_request(batch, cfg.views, cfg.vocab_size, seed=batch).items()}
        with torch.inference_mode():
            prefix_kv, mask = policy.encode(request["images"], request["tokens"])
            actions = policy.decode(prefix_kv, mask, request["state"], request["noise"])
        cases[batch] = (request, prefix_kv, mask, actions)
    return cases


def per_kind(by_name: dict) -> dict[str, float]:
    """GPU ms per kernel kind (each flow step's own three kernels under "step", PyTorch's under "other")."""
    times: dict[str, float] = {}
    for name, (_, ms) in by_name.items():
        kind = next((k for n, k in KIND_OF_KERNEL.items() if n in name), "other")
        times[kind] = times.get(kind, 0.0) + ms
    return {k: round(v, 3) for k, v in times.items()}


def graphed(fn, inputs, choices) -> CudaGraphs:
    graphs = CudaGraphs(torch, fn, DEVICE, choices)
    with torch.inference_mode():
        graphs.capture([t.clone() for t in inputs])
    return graphs


def measure(graphs: CudaGraphs, batch: int, inputs, reference) -> dict:
    graph, static_inputs, static_outputs = graphs.graphs[batch]
    with torch.inference_mode():
        for static, value in zip(static_inputs, inputs):
            static.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        error = compare(static_outputs[0], reference)
        ms = replay_ms(graph.replay, 50)
        count, busy, by_name = kernel_times(graph)
    return {
        "graph_ms": round(ms, 3), "kernels": count, "busy_ms": round(busy, 3), "rel": float(f"{error['rel']:.3g}"),
        "right": error["rel"] <= REL_TOLERANCE["bf16"], "attention": graphs.chosen.get(batch),
        "kinds_ms": per_kind(by_name),
    }  # fmt: skip


def fused_run(policy, tiles: dict, batch: int, inputs, reference, pdl: str = "off", ahead: str = "off",
              merge: str = "last") -> dict:  # fmt: skip
    fused = FusedDecoder(policy, tiles, pdl=pdl, ahead=ahead, merge=merge)
    started = time.perf_counter()
    graphs = graphed(lambda *i: [fused.decode(*i)], inputs, {"fused": contextlib.nullcontext})
    result = measure(graphs, batch, inputs, reference)
    result.update(tiles=tiles, pdl=pdl, ahead=ahead, merge=merge, setup_s=round(time.perf_counter() - started, 1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="pi0")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--sweep", type=int, default=len(OPTIONS["qkv"]), help="launch-option sets to try per batch")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    batches, cfg, policy = bf16_policy(args, "fused")
    cases = {
        batch: ([prefix_kv, mask, request["state"], request["noise"]], actions)
        for batch, (request, prefix_kv, mask, actions) in eager_cases(policy, batches).items()
    }
    served = Decoder(policy).eval()
    compile_layers(torch, served)
    # as the runtime offers them (the fused decoder aside)
    served_choices = {**sdpa_choices(torch), **compiled_attention_choices(torch, triton_attention=True)}
    rows = []
    result = {
        "date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "preset": cfg.name, "views": cfg.views, "options": OPTIONS, "rows": rows,
    }  # fmt: skip
    for batch in batches:
        inputs, reference = cases[batch]
        t0 = time.perf_counter()
        served_graphs = graphed(lambda *i: [served(*i)], inputs, served_choices)
        row = {"batch": batch, "served": measure(served_graphs, batch, inputs, reference)}
        row["served"]["setup_s"] = round(time.perf_counter() - t0, 1)
        del served_graphs
        print(f"[fused] batch {batch}: served {row['served']}", flush=True)
        tries = []
        for i in range(args.sweep):
            tiles = {kind: options[i] for kind, options in OPTIONS.items()}
            try:
                tries.append(fused_run(policy, tiles, batch, inputs, reference))
            except Exception as exc:  # noqa: BLE001 - e.g. Triton's OutOfResources: a block too large for this GPU
                torch.cuda.synchronize()
                tries.append({"tiles": tiles, "right": False, "error": str(exc).splitlines()[0][:200]})
            print(f"[fused] batch {batch} set {i}: {tries[-1]}", flush=True)
        right = [r for r in tries if r["right"]]
        best = {kind: min(right, key=lambda r: r["kinds_ms"].get(kind, 0.0))["tiles"][kind] for kind in OPTIONS} if right else {}  # fmt: skip
        row["sweep"] = tries
        try:
            row["fused"] = fused_run(policy, best, batch, inputs, reference)
        except Exception as exc:  # noqa: BLE001 - keep what was measured
            row["fused"] = {"tiles": best, "right": False, "error": str(exc).splitlines()[0][:200]}
        print(f"[fused] batch {batch} best per kind: {row['fused']}", flush=True)
        rows.append(row)
        Path(args.out).write_text(json.dumps(result, indent=2))  # after every batch: a later failure keeps these
    rows = [r for r in rows if "graph_ms" in r["fused"]]
    print(
        f"\n{'batch':>5} | {'served ms':>9} {'kernels':>7} {'rel':>8} | {'fused ms':>8} {'kernels':>7} {'rel':>8} | speed-up"
    )
    for r in rows:
        s, f = r["served"], r["fused"]
        mark = "" if f["right"] else "  WRONG (void)"
        print(f"{r['batch']:5d} | {s['graph_ms']:9.2f} {s['kernels']:7d} {s['rel']:8.2g} | {f['graph_ms']:8.2f} "
              f"{f['kernels']:7d} {f['rel']:8.2g} | {s['graph_ms'] / f['graph_ms']:7.2f}x{mark}")  # fmt: skip
    for r in rows:
        print(f"batch {r['batch']}: fused ms per kind {r['fused']['kinds_ms']}; options {r['fused']['tiles']}")


if __name__ == "__main__":
    main()
