"""What to compile, measured before building it into the runtime (docs/BENCHMARKS.md).

Builds the policy on the GPU (random weights, bf16, 2 views), then for each variant captures one CUDA
graph per bucket and times its replay (median of 20), checking the output against the eager module:

- ``*_eager``: the plain module (what the TorchScript runtime runs), attention kernel chosen per bucket;
- ``*_blocks``: each layer's methods torch.compile'd (Inductor, static shapes), as the runtime does now;
- ``decoder_step``: one whole Euler step (all 18 expert layers) compiled as one graph;
- ``*_blocks_attn``: layers compiled, and attention written out (matmuls, float32 softmax) and compiled.

    python -m benchmarks.compile_probe --preset pi0 --buckets 1,16 --profile --out $OUT/compile_probe.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

from benchmarks.profile_runtime import kernel_times, replay_ms
from vlaserve.model.parity import compare, random_request
from vlaserve.model.policy import STAGES, attention_math, attention_override, build_policy
from vlaserve.model.presets import get_preset
from vlaserve.runtimes import CudaGraphs, compile_layers, sdpa_choices


def log(msg: str) -> None:
    print(f"[probe] {msg}", flush=True)


VARIANTS = {  # name: (model, what is compiled)
    "encoder_eager": ("encoder", None),
    "encoder_blocks": ("encoder", "blocks"),
    "encoder_blocks_attn": ("encoder", "blocks+attn"),
    "decoder_eager": ("decoder", None),
    "decoder_blocks": ("decoder", "blocks"),
    "decoder_blocks_attn": ("decoder", "blocks+attn"),
    "decoder_step": ("decoder", "step"),
}


def compile_parts(module, what: str | None) -> list:
    """Replace methods by torch.compile'd ones on the instances; returns the (object, name) pairs to undo.
    "blocks" compiles what the runtime compiles (vlaserve.runtimes.compile_layers), "step" a whole Euler step."""
    if what and what.startswith("blocks"):
        return compile_layers(torch, module)
    if what == "step":
        module.policy.velocity = torch.compile(module.policy.velocity, dynamic=False)
        return [(module.policy, "velocity")]
    return []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="pi0")
    parser.add_argument("--buckets", default="1,16")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--profile", action="store_true", help="kernel count and the top kernels per row")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    buckets = [int(b) for b in args.buckets.split(",")]
    cfg = get_preset(args.preset, 2)
    started = time.perf_counter()
    policy = build_policy(cfg, seed=0, device="cuda").to(torch.bfloat16)
    log(f"built {args.preset} in {time.perf_counter() - started:.1f} s")

    def inputs(model: str, batch: int, seed: int) -> list:
        r = {k: v.cuda() for k, v in random_request(batch, cfg.views, cfg.vocab_size, seed).items()}
        if model == "encoder":
            return [r["images"], r["tokens"]]
        with torch.inference_mode():
            kv, mask = policy.encode(r["images"], r["tokens"])
        return [kv, mask, r["state"], r["noise"]]

    compiled_math = torch.compile(attention_math, dynamic=False)
    refs = {}
    rows = []
    for variant in args.variants.split(","):
        model, what = VARIANTS[variant]
        module = STAGES[model](policy)
        fresh = {b: inputs(model, b, seed=100 + b) for b in buckets}
        if what is None:
            with torch.inference_mode():
                refs.update({(model, b): _tuple(module(*fresh[b]))[0].float() for b in buckets})
        undo = compile_parts(module, what)
        choices = {"default": contextlib.nullcontext} if what else sdpa_choices(torch)
        graphs = CudaGraphs(torch, lambda *t, m=module: list(_tuple(m(*t))), "cuda:0", choices=choices)
        try:
            attn = attention_override(compiled_math) if what and what.endswith("+attn") else contextlib.nullcontext()
            with torch.inference_mode(), attn:
                for batch in sorted(buckets, reverse=True):
                    t0 = time.perf_counter()
                    graphs.capture(inputs(model, batch, seed=batch))
                    capture_s = time.perf_counter() - t0
                    got = graphs.replay(fresh[batch])[0].float()
                    ms = replay_ms(graphs.graphs[batch][0].replay)
                    row = {"variant": variant, "batch": batch, "graph_ms": round(ms, 2),
                           "rel_vs_eager": compare(got, refs[(model, batch)])["rel"],
                           "capture_s": round(capture_s, 1), "attention": graphs.chosen[batch]}  # fmt: skip
                    if args.profile:
                        row.update(profile(graphs.graphs[batch][0]))
                    rows.append(row)
                    log(json.dumps(row))
                    Path(args.out).write_text(json.dumps(rows, indent=2))
        except Exception as exc:  # noqa: BLE001 - report and go on with the next variant
            log(f"{variant}: FAILED {type(exc).__name__}: {str(exc)[:600]}")
        for obj, name in undo:
            delattr(obj, name)
        torch._dynamo.reset()
        del graphs
        torch.cuda.empty_cache()
    print(f"\n{'variant':18} {'batch':>5} {'graph ms':>9} {'rel':>9} {'capture s':>9}")
    for r in rows:
        print(f"{r['variant']:18} {r['batch']:5d} {r['graph_ms']:9.2f} {r['rel_vs_eager']:9.2e} {r['capture_s']:9.1f}")


def profile(graph) -> dict:
    count, busy, by_name = kernel_times(graph, name_chars=70)
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:8]
    return {"kernels": count, "busy_ms": round(busy, 2), "top": [(n, c, round(t, 2)) for n, (c, t) in top]}


def _tuple(out):
    return out if isinstance(out, (tuple, list)) else (out,)


if __name__ == "__main__":
    main()
