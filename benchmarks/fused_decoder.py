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
from vlaserve.model.policy import Decoder, attention_override, build_policy
from vlaserve.model.presets import get_preset
from vlaserve.runtimes import CudaGraphs, _compiled_attention_math, compile_layers

DEVICE = "cuda:0"
TILES = {  # candidate matmul blocks (columns, reduction) per kernel kind, tried at the first batch size
    "a": {"qkv": (32, 64), "o": (32, 64), "geglu": (32, 64), "down": (32, 64)},
    "b": {"qkv": (32, 128), "o": (32, 128), "geglu": (64, 64), "down": (32, 128)},
    "c": {"qkv": (64, 64), "o": (16, 128), "geglu": (32, 128), "down": (16, 256)},
    "d": {"qkv": (32, 64), "o": (32, 128), "geglu": (64, 128), "down": (32, 256)},
}


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
        count, busy, _ = kernel_times(graph)
    return {
        "graph_ms": round(ms, 3), "kernels": count, "busy_ms": round(busy, 3), "rel": float(f"{error['rel']:.3g}"),
        "right": error["rel"] <= REL_TOLERANCE["bf16"], "attention": graphs.chosen.get(batch),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="pi0")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument(
        "--tiles", default=",".join(TILES), help=f"tile sets to try at the first batch ({', '.join(TILES)})"
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cfg = get_preset(args.preset, args.views)
    started = time.perf_counter()
    policy = build_policy(cfg, seed=0, dtype=torch.bfloat16, device=DEVICE)
    print(f"[fused] {cfg.name} policy built in {time.perf_counter() - started:.1f} s", flush=True)
    served = Decoder(policy).eval()
    compile_layers(torch, served)
    math_impl = _compiled_attention_math(torch)
    served_choices = {"default": contextlib.nullcontext, "compiled_math": lambda: attention_override(math_impl)}
    rows, best_tiles = [], None
    for batch in batches:
        request = {k: v.to(DEVICE) for k, v in random_request(batch, cfg.views, cfg.vocab_size, seed=batch).items()}
        with torch.inference_mode():
            prefix_kv, mask = policy.encode(request["images"], request["tokens"])
            inputs = [prefix_kv, mask, request["state"], request["noise"]]
            reference = policy.decode(*inputs)
        t0 = time.perf_counter()
        row = {
            "batch": batch,
            "served": measure(graphed(lambda *i: [served(*i)], inputs, served_choices), batch, inputs, reference),
        }
        row["served"]["setup_s"] = round(time.perf_counter() - t0, 1)
        candidates = [best_tiles] if best_tiles else args.tiles.split(",")
        for name in candidates:
            fused = FusedDecoder(policy, TILES[name])
            t0 = time.perf_counter()
            result = measure(graphed(lambda *i, f=fused: [f.decode(*i)], inputs, {"fused": contextlib.nullcontext}), batch, inputs, reference)  # fmt: skip
            result.update(tiles=name, setup_s=round(time.perf_counter() - t0, 1))
            row.setdefault("fused_tries", []).append(result)
            print(f"[fused] batch {batch} tiles {name}: {result}", flush=True)
        right = [r for r in row["fused_tries"] if r["right"]]
        row["fused"] = min(right, key=lambda r: r["graph_ms"]) if right else row["fused_tries"][0]
        best_tiles = best_tiles or row["fused"]["tiles"]
        rows.append(row)
        print(f"[fused] batch {batch}: served {row['served']}", flush=True)
    result = {
        "date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "preset": cfg.name, "views": cfg.views, "tiles": TILES, "rows": rows,
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"\n{'batch':>5} | {'served ms':>9} {'kernels':>7} {'rel':>8} | {'fused ms':>8} {'kernels':>7} {'rel':>8} {'tiles':>5} | speed-up"
    )
    for r in rows:
        s, f = r["served"], r["fused"]
        mark = "" if f["right"] else "  WRONG (void)"
        print(f"{r['batch']:5d} | {s['graph_ms']:9.2f} {s['kernels']:7d} {s['rel']:8.2g} | {f['graph_ms']:8.2f} "
              f"{f['kernels']:7d} {f['rel']:8.2g} {f['tiles']:>5} | {s['graph_ms'] / f['graph_ms']:.2f}x{mark}")  # fmt: skip


if __name__ == "__main__":
    main()
