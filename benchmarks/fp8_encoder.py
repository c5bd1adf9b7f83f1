"""The encoder's matrix products in float8 (vlaserve.model.fp8) against bfloat16, in-process on a GPU.

For each batch size: the encoder as the `gpu` variant serves it (each layer compiled by Inductor, one CUDA
graph) in bf16, and the same with every linear layer of its vision and prefix layers in fp8 e4m3 (per-
channel weight scales, per-token input scales). Each is timed as a graph replay. The fp8 encoder's
prefix keys/values are compared with bf16 eager PyTorch's, and so are the actions the bf16 decoder
computes from them (the same noise): the action error is what fp8 costs a robot.

    python -m benchmarks.fp8_encoder --batches 1,16 --out $OUT/fp8-encoder.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import time
from pathlib import Path

import torch

from benchmarks.fused_decoder import bf16_policy, eager_cases, graphed
from benchmarks.profile_runtime import replay_ms
from vlaserve.model.fp8 import to_fp8
from vlaserve.model.parity import compare
from vlaserve.model.policy import Encoder
from vlaserve.runtimes import compile_layers

DEVICE = "cuda:0"


# Which linear layers go to fp8, as (module, attribute) pairs. The MLPs' output projections (SigLIP's fc2,
# Gemma's down_proj) take the GELU's output, whose rows have the widest range. "served" is what the spec's
# `precision: fp8` computes in fp8 (vlaserve.model.policy.Encoder.fp8_targets).
def linears(layers, skip: tuple[str, ...] = ()):
    return [(child, attr) for layer in layers for child in layer.modules()
            for attr, m in child.named_children() if isinstance(m, torch.nn.Linear) and attr not in skip]  # fmt: skip


SCOPES = {
    "all": lambda p: linears([*p.vision.blocks, *p.prefix_layers]),
    "vision": lambda p: linears(p.vision.blocks),
    "prefix": lambda p: linears(p.prefix_layers),
    "all_but_mlp_out": lambda p: linears([*p.vision.blocks, *p.prefix_layers], ("fc2", "down_proj")),
    "served": lambda p: list(Encoder(p).fp8_targets()),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="pi0")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--scopes", default="all", help="which layers go to fp8, comma-separated (SCOPES)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    batches, cfg, policy = bf16_policy(args, "fp8")
    cases = eager_cases(policy, batches)  # bf16 eager references, before anything is compiled
    encoders = {"bf16": Encoder(policy).eval()}
    scopes = {}
    request, prefix_kv, mask, actions = cases[batches[0]]
    for scope in args.scopes.split(","):  # each scope's error in eager PyTorch, before anything is compiled
        fp8_policy = copy.deepcopy(policy)
        converted = to_fp8(SCOPES[scope](fp8_policy))
        encoders[f"fp8 {scope}"] = Encoder(fp8_policy).eval()
        with torch.inference_mode():
            kv, _ = encoders[f"fp8 {scope}"](request["images"], request["tokens"])
            got = policy.decode(kv, mask, request["state"], request["noise"])
        scopes[scope] = {"layers": converted, "prefix_rel": float(f"{compare(kv.float(), prefix_kv.float())['rel']:.3g}"),
                         "actions_rel": float(f"{compare(got.float(), actions.float())['rel']:.3g}")}  # fmt: skip
        print(f"[fp8] eager, batch {batches[0]}, {scope}: {scopes[scope]}", flush=True)
    result = {
        "date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "preset": cfg.name, "views": cfg.views, "eager_scopes": scopes, "rows": [],
    }  # fmt: skip
    for encoder in encoders.values():
        compile_layers(torch, encoder)
    for batch in batches:
        request, prefix_kv, mask, actions = cases[batch]
        row = {"batch": batch}
        for precision, encoder in encoders.items():
            t0 = time.perf_counter()
            graphs = graphed(lambda *i, e=encoder: list(e(*i)), [request["images"], request["tokens"]],
                             {"default": contextlib.nullcontext})  # fmt: skip
            graph, _, outputs = graphs.graphs[batch]
            with torch.inference_mode():
                graph.replay()
                torch.cuda.synchronize()
                got_kv = outputs[0].clone()
                got_actions = policy.decode(got_kv, mask, request["state"], request["noise"])
            row[precision] = {
                "graph_ms": round(replay_ms(graph.replay, 30), 3),
                "prefix_rel": float(f"{compare(got_kv.float(), prefix_kv.float())['rel']:.3g}"),
                "actions_rel": float(f"{compare(got_actions.float(), actions.float())['rel']:.3g}"),
                "setup_s": round(time.perf_counter() - t0, 1),
            }
            del graphs
            print(f"[fp8] batch {batch} {precision}: {row[precision]}", flush=True)
        result["rows"].append(row)
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'batch':>5} {'encoder':24} {'graph ms':>8} {'prefix rel':>10} {'actions rel':>11} {'vs bf16':>7}")
    for r in result["rows"]:
        for name in encoders:
            e = r[name]
            print(f"{r['batch']:5d} {name:24} {e['graph_ms']:8.2f} {e['prefix_rel']:10.2g} {e['actions_rel']:11.2g} "
                  f"{r['bf16']['graph_ms'] / e['graph_ms']:6.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
