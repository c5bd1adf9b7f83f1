"""The decoder's attention alone, per implementation and batch, on a GPU: µs per call and error.

At pi0's expert shapes (51 suffix tokens, 8 query heads over 1 key/value head of 256, the prefix of the
chosen views plus the suffix as keys), each implementation a CUDA graph may be captured with
(vlaserve.runtimes: SDPA as torch picks it, SDPA's memory-efficient kernel, the compiled written-out
attention, and vlaserve.model.kernels.triton_attention) is timed as a CUDA graph of one call per expert layer
(each layer its own keys and values, as in the decoder), and its output on layer 0 is compared with
``attention_math`` in float32. The mask is the decoder's (vlaserve.model.policy.Policy.suffix_mask, a prompt
shorter than its padding). Prints a table last. ``--sweep`` times triton_attention instead over a grid of
launch settings (rows per block, keys per block, warps, stages; key splits as its rule picks them, and 2): above 64 rows the fastest per batch is what the "bias" entries of vlaserve.model.kernels.TILES_BY_ROWS should hold (the fused decoder's own attention, which computes its mask in the kernel, is swept by benchmarks/decoder_kernels.py).

    source benchmarks/gpu_env.sh && python -m benchmarks.attention_bench --batches 1,2,4,8,16 --out $OUT/attention.json
    python -m benchmarks.attention_bench --batches 8,16 --sweep --out $OUT/attention-sweep.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import itertools
import json
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.profile_runtime import replay_ms
from vlaserve.interface import ACTION_HORIZON
from vlaserve.model.kernels import triton_attention
from vlaserve.model.parity import compare
from vlaserve.model.policy import attention, attention_bias, attention_math, attention_override, build_policy
from vlaserve.model.presets import get_preset


def implementations() -> dict:
    compiled = torch.compile(attention_math, dynamic=False)
    return {
        "sdpa": contextlib.nullcontext,
        "efficient": lambda: sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]),
        "compiled_math": lambda: attention_override(compiled),
        "triton_attention": lambda: attention_override(triton_attention),
        # the same with the keys split four times as much (about 4 x 132 programs): where it gains, the
        # default's split rule is the thing to change
        "triton_x4": lambda: attention_override(functools.partial(triton_attention, target_programs=528)),
        # stages left out, to place the time inside the kernel (their outputs are void: not the attention)
        "triton_no_merge": lambda: attention_override(functools.partial(triton_attention, merge="none")),
        "triton_one_split": lambda: attention_override(functools.partial(triton_attention, tiles={"splits": 1})),
        # the key splits merged by a kernel of its own instead of the last split to finish
        "triton_merge_kernel": lambda: attention_override(functools.partial(triton_attention, merge="kernel")),
    }


SWEEP = tuple(itertools.product(((16, 32), (16, 64), (32, 32), (32, 64)), (4, 8), (2, 3)))


def parse_settings(text: str) -> tuple:
    """ "64x32w8s2,32x64w4s2" -> ((64, 32), 8, 2), ((32, 64), 4, 2): rows x keys per block, warps, stages."""
    out = []
    for item in text.split(","):
        rows_keys, rest = item.split("w")
        warps, stages = rest.split("s")
        am, an = rows_keys.split("x")
        out.append(((int(am), int(an)), int(warps), int(stages)))
    return tuple(out)


def sweep(settings=SWEEP) -> dict:
    """triton_attention over launch settings ((rows, keys), warps, stages), each with the key splits its rule
    picks and with 2: {name: context manager factory}."""
    out = {}
    for ((am, an), warps, stages), splits in itertools.product(settings, (0, 2)):
        tiles = {"attention": (am, an, warps, stages), "splits": splits}
        out[f"{am}x{an} w{warps} s{stages} k{splits or 'auto'}"] = lambda tiles=tiles: attention_override(
            functools.partial(triton_attention, tiles=tiles)
        )
    return out


def bench(batch: int, cfg, policy, impls: dict, device: str) -> dict:
    e = cfg.expert
    t, p = 1 + ACTION_HORIZON, cfg.prefix_len
    s = p + t
    gen = torch.Generator(device).manual_seed(batch)
    dtype = torch.bfloat16
    q = torch.randn((batch, t, e.num_heads, e.head_dim), generator=gen, device=device, dtype=dtype)
    kv = torch.randn((batch, e.depth, 2, e.num_kv_heads, s, e.head_dim), generator=gen, device=device, dtype=dtype)
    prefix_mask = torch.ones((batch, p), dtype=torch.bool, device=device)
    prefix_mask[:, p - 20 :] = False  # a prompt 20 tokens shorter than the padding
    bias = attention_bias(policy.suffix_mask(prefix_mask), e.num_heads // e.num_kv_heads, dtype, s)
    ref = attention_math(q.float(), kv[:, 0, 0].float(), kv[:, 0, 1].float(), bias.float())
    row = {"batch": batch}
    for name, context in impls.items():
        try:
            with context():

                def calls():
                    return [attention(q, kv[:, i, 0], kv[:, i, 1], bias) for i in range(e.depth)]

                out = calls()[0]  # warm-up (compiles)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    outs = calls()
            graph.replay()
            torch.cuda.synchronize()
            row[name] = {
                "us": round(replay_ms(graph.replay) * 1e3 / e.depth, 2),
                "rel": float(f"{compare(outs[0].float(), ref)['rel']:.3g}"),
                "rel_eager": float(f"{compare(out.float(), ref)['rel']:.3g}"),
            }
        except Exception as exc:  # noqa: BLE001 - one implementation failing leaves the others' figures
            torch.cuda.synchronize()
            row[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        print(f"[attention] batch {batch} {name}: {row[name]}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--sweep", action="store_true", help="triton_attention's launch settings instead")
    parser.add_argument("--settings", default="", help='with --sweep, these instead of the grid: "64x32w8s2,..."')
    parser.add_argument("--impls", default="", help="only these implementations (comma-separated names)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = "cuda:0"
    cfg = get_preset("pi0", args.views)
    policy = build_policy(get_preset("tiny", args.views))  # only its suffix_mask (no weights of pi0 needed)
    impls = (sweep(parse_settings(args.settings)) if args.settings else sweep()) if args.sweep else implementations()
    if args.impls:
        unknown = set(args.impls.split(",")) - set(impls)
        if unknown:
            parser.error(f"--impls: no implementation {sorted(unknown)}; there are {sorted(impls)}")
        impls = {name: impls[name] for name in args.impls.split(",")}
    rows = [bench(int(b), cfg, policy, impls, device) for b in args.batches.split(",")]
    Path(args.out).write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "views": args.views, "rows": rows,
    }, indent=2))  # fmt: skip
    if args.sweep:
        for row in rows:
            timed = sorted((v["us"], name, v["rel"]) for name, v in row.items() if isinstance(v, dict) and "us" in v)
            print(f"batch {row['batch']}: fastest " + "; ".join(f"{n} {us} us (rel {r:.1e})" for us, n, r in timed[:6]))
        return
    print(f"\n{'batch':>5} " + " ".join(f"{n:>22}" for n in impls) + "   (µs per call, rel to float32)")
    for row in rows:
        cells = [f"{row[n]['us']:9.2f} ({row[n]['rel']:.1e})" if "us" in row[n] else f"{'error':>22}" for n in impls]
        print(f"{row['batch']:>5} " + " ".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
