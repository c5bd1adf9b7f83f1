"""realtime-vla's pi0 (hand-written Triton kernels, one CUDA graph, batch 1) against vlaserve's in-process
batch-1 path, on the same GPU in the same run, both with random bf16 weights, 2 views, 50 actions.

- realtime-vla: ``Pi0Inference`` from ``.peers/realtime-vla/pi0_infer.py`` (``bash benchmarks/get_peers.sh``
  puts it there; it is never committed), a 20-token prompt, timed through its ``forward`` (input copies and
  one graph replay).
- vlaserve, as the `gpu` variant serves each model, timed as graph replays: the encoder with each layer
  compiled by Inductor (the faster attention kept), then the decoder as its fused Triton kernels and as
  the compiled decoder. Each graph's output is compared with eager PyTorch's (over the bf16 parity
  tolerance, the figures are void). Its prompt is padded to 48 tokens, so its encoder has 28 more prefix tokens
  (560 against 532: about 5 % more encoder work).

    python -m benchmarks.realtime_vla_peer --out $OUT/realtime-vla.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import subprocess
import time
from pathlib import Path

import torch

from benchmarks.fused_decoder import graphed
from benchmarks.profile_runtime import replay_ms
from vlaserve.model.kernels import FusedDecoder
from vlaserve.model.parity import REL_TOLERANCE, compare, random_request
from vlaserve.model.policy import STAGES, build_policy
from vlaserve.model.presets import get_preset
from vlaserve.runtimes import compile_layers, compiled_attention_choices, sdpa_choices

DEVICE = "cuda:0"
PEERS = Path(__file__).resolve().parents[1] / ".peers" / "realtime-vla"


def realtime_vla(views: int, prompt: int, repeats: int) -> dict:
    path = PEERS / "pi0_infer.py"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `bash benchmarks/get_peers.sh` (with network) first")
    spec = importlib.util.spec_from_file_location("pi0_infer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    embeds = torch.randn(prompt, 2048, generator=gen, device=DEVICE).to(torch.bfloat16)
    started = time.perf_counter()
    model = module.Pi0Inference({"language_embeds": embeds}, num_views=views, chunk_size=50)
    with torch.no_grad():  # random weights into the buffers its graph reads (recorded before: same kernels)
        for name, weight in model.weights.items():
            if name != "language_embeds":
                weight.copy_(torch.randn(weight.shape, generator=gen, device=DEVICE) * 0.02)
    setup_s = time.perf_counter() - started
    images = torch.rand(views, 224, 224, 3, generator=gen, device=DEVICE).to(torch.bfloat16) * 2 - 1
    state = torch.randn(32, generator=gen, device=DEVICE).to(torch.bfloat16)
    noise = torch.randn(50, 32, generator=gen, device=DEVICE).to(torch.bfloat16)
    actions = model.forward(images, state, noise)
    torch.cuda.synchronize()
    ms = replay_ms(lambda: model.forward(images, state, noise), repeats)
    commit = subprocess.run(["git", "-C", str(PEERS), "log", "--format=%h", "-1"], capture_output=True, text=True)
    return {"ms": round(ms, 3), "graph_ms": round(replay_ms(model.infer_graph.replay, repeats), 3),
            "finite": bool(torch.isfinite(actions).all()), "setup_s": round(setup_s, 1), "prompt_tokens": prompt,
            "commit": commit.stdout.strip()}  # fmt: skip


def vlaserve(views: int, repeats: int) -> dict:
    cfg = get_preset("pi0", views)
    policy = build_policy(cfg, seed=0, dtype=torch.bfloat16, device=DEVICE)
    choices = {**sdpa_choices(torch), **compiled_attention_choices(torch)}  # as the runtime offers them
    # the decoder's with fused_kernels (the fused decoder is timed on its own below)
    decoder_choices = {**sdpa_choices(torch), **compiled_attention_choices(torch, triton_attention=True)}
    request = {k: v.to(DEVICE) for k, v in random_request(1, views, cfg.vocab_size, seed=1).items()}
    enc_inputs = [request["images"], request["tokens"]]
    with torch.inference_mode():  # eager references first: compiling patches the layers the policy shares
        prefix_kv, mask = policy.encode(*enc_inputs)
        dec_inputs = [prefix_kv, mask, request["state"], request["noise"]]
        reference = policy.decode(*dec_inputs)
    encoder = STAGES["encoder"](policy).eval()
    compile_layers(torch, encoder)
    enc_graphs = graphed(lambda *i: list(encoder(*i)), enc_inputs, choices)
    decoder = STAGES["decoder"](policy).eval()
    compile_layers(torch, decoder)
    compiled_graphs = graphed(lambda *i: [decoder(*i)], dec_inputs, decoder_choices)
    fused = FusedDecoder(policy)
    fused_graphs = graphed(lambda *i: [fused.decode(*i)], dec_inputs, {"fused": contextlib.nullcontext})
    with torch.inference_mode():  # each graph's answer against eager PyTorch on the same inputs
        rel = {}
        for name, graphs, expected in (("encoder", enc_graphs, prefix_kv), ("decoder_compiled", compiled_graphs, reference),
                                       ("decoder_fused", fused_graphs, reference)):  # fmt: skip
            graph, static_inputs, static_outputs = graphs.graphs[1]
            for static, value in zip(static_inputs, enc_inputs if name == "encoder" else dec_inputs):
                static.copy_(value)
            graph.replay()
            rel[name] = float(f"{compare(static_outputs[0], expected)['rel']:.3g}")
    out = {
        "rel": rel,
        "right": all(r <= REL_TOLERANCE["bf16"] for r in rel.values()),
        "encoder_ms": round(replay_ms(enc_graphs.graphs[1][0].replay, repeats), 3),
        "decoder_compiled_ms": round(replay_ms(compiled_graphs.graphs[1][0].replay, repeats), 3),
        "decoder_fused_ms": round(replay_ms(fused_graphs.graphs[1][0].replay, repeats), 3),
        "prefix_tokens": cfg.prefix_len,
    }
    out["total_ms"] = round(out["encoder_ms"] + min(out["decoder_compiled_ms"], out["decoder_fused_ms"]), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=20, help="realtime-vla's prompt tokens")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    result["realtime_vla"] = realtime_vla(args.views, args.prompt, args.repeats)
    print(f"[peer] realtime-vla: {result['realtime_vla']}", flush=True)
    torch.cuda.empty_cache()
    result["vlaserve"] = vlaserve(args.views, args.repeats)
    print(f"[peer] vlaserve: {result['vlaserve']}", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    r, v = result["realtime_vla"], result["vlaserve"]
    print(f"\n{'in-process, batch 1, ' + str(args.views) + ' views':44} {'ms':>8}")
    print(f"{'realtime-vla Pi0Inference.forward':44} {r['ms']:8.2f}")
    print(f"{'vlaserve encoder (compiled, graph)':44} {v['encoder_ms']:8.2f}")
    print(f"{'vlaserve decoder, compiled (graph)':44} {v['decoder_compiled_ms']:8.2f}")
    print(f"{'vlaserve decoder, fused kernels (graph)':44} {v['decoder_fused_ms']:8.2f}")
    print(
        f"{'vlaserve encoder + faster decoder':44} {v['total_ms']:8.2f}  ({v['total_ms'] / r['ms']:.2f}x realtime-vla)"
    )


if __name__ == "__main__":
    main()
