"""Where the encoder's strided copies come from, and what drops them: on a GPU, at pi0's shapes.

The encoder's profile at bucket 16 (benchmarks/gpu_encoder_profile.sh) holds PyTorch's own strided-copy
kernels beside cuDNN's attention: one per SigLIP layer, one more per prefix layer at 16. This probe times, as
CUDA graphs at ``--batches`` (2 views each): one SigLIP layer compiled as the served encoder compiles it,
under each SDPA priority order of ``ORDERS`` (set while compiling and capturing), and in the other forms of
``SIGLIP_FORMS``, each of its four products alone (``PRODUCTS``, eager: which kernel adds its bias), and SDPA
alone on its q, k and v under each order; and one prefix layer's attention
(vlaserve.model.policy.attention, run between the compiled halves of a layer as served) under each order that
takes its additive bias, with its queries as GemmaBlock.qkv gives them now (a tensor of their own) and as a
slice of the rotated queries and keys, as it gave them before. For each: replay µs, the kernels by kind
(benchmarks.profile_runtime.kernel_kind) and the longest kernels, and the output against the first form's
(rel); for the served SigLIP layer and the forms of ``CODE_FORMS``, the library calls in the code Inductor
generated (which product takes which input, and with what strides). Prints a table last.

    source benchmarks/gpu_env.sh && python -m benchmarks.encoder_attention_probe --batches 1,16 --out $OUT/probe.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.profile_runtime import by_kind, kernel_times, replay_ms
from vlaserve.model.parity import compare
from vlaserve.model.policy import UNPADDED, GemmaBlock, SiglipBlock, attention, attention_bias, rope_tables
from vlaserve.model.presets import get_preset

DEVICE = "cuda:0"
B = SDPBackend
ORDERS = {  # SDPA's backends in priority order (sdpa_kernel(..., set_priority=True)); "default" is torch's own
    "default": None,
    "flash_first": [B.FLASH_ATTENTION, B.CUDNN_ATTENTION, B.EFFICIENT_ATTENTION, B.MATH],
    "efficient_first": [B.EFFICIENT_ATTENTION, B.CUDNN_ATTENTION, B.FLASH_ATTENTION, B.MATH],
    "cudnn_first": [B.CUDNN_ATTENTION, B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION, B.MATH],
}


def with_bias(linear: torch.nn.Linear, h):
    """The layer's own product: cuBLAS adds the bias (torch.addmm)."""
    return linear(h)


def bias_after(linear: torch.nn.Linear, h):
    """The product without its bias, the bias added after it: Inductor can add it in the kernel that follows."""
    return torch.nn.functional.linear(h, linear.weight) + linear.bias


def siglip_qkv(block: SiglipBlock, x, product=with_bias):
    """q, k, v [B, heads, T, D] of the SigLIP layer on x, as SiglipBlock.forward makes them."""
    b, t, _ = x.shape
    return product(block.qkv, block.norm1(x)).view(b, t, 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)


def siglip_finish(block: SiglipBlock, x, attn, product=with_bias):
    """The rest of the SigLIP layer after its attention, as SiglipBlock.forward does it."""
    b, t, w = x.shape
    x = x + product(block.out, attn.transpose(1, 2).reshape(b, t, w))
    return x + product(block.fc2, torch.nn.functional.gelu(product(block.fc1, block.norm2(x)), approximate="tanh"))


def siglip_layer(block: SiglipBlock, x, product=with_bias):
    """The whole SigLIP layer, as SiglipBlock.forward computes it when ``product`` is ``with_bias``."""
    q, k, v = siglip_qkv(block, x, product)
    return siglip_finish(block, x, torch.nn.functional.scaled_dot_product_attention(q, k, v), product)


def siglip_split(block: SiglipBlock, order=None):
    """The SigLIP layer with its attention outside the compiled code: norm and q/k/v compiled, SDPA as it comes
    (or under ``order``), the output projection and the MLP compiled (as the prefix layers are served)."""
    pre = torch.compile(lambda x: siglip_qkv(block, x), dynamic=False)
    post = torch.compile(lambda x, attn: siglip_finish(block, x, attn), dynamic=False)

    def forward(x):
        q, k, v = pre(x)
        with context(order):
            attn = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return post(x, attn)

    return forward


def siglip_contiguous(block: SiglipBlock):
    """The SigLIP layer compiled whole, its q, k and v made contiguous before SDPA (a copy Inductor writes)."""

    def forward(x):
        q, k, v = siglip_qkv(block, x).contiguous()
        return siglip_finish(block, x, torch.nn.functional.scaled_dot_product_attention(q, k, v))

    return torch.compile(forward, dynamic=False)


def siglip_flash_inside(block: SiglipBlock):
    """The SigLIP layer compiled whole, with SDPA's flash kernel first inside the compiled function."""

    def forward(x):
        q, k, v = siglip_qkv(block, x)
        with sdpa_kernel(ORDERS["flash_first"], set_priority=True):
            attn = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return siglip_finish(block, x, attn)

    return torch.compile(forward, dynamic=False)


def siglip_bias_after(block: SiglipBlock):
    """The SigLIP layer compiled whole, each product without its bias and the bias added after it. cuBLAS then
    gets no product with a bias: where it cannot add one in its epilogue, torch copies the bias into every row
    of the output first and asks for a product that adds to it (a ``badd`` kernel in the profile)."""
    return torch.compile(lambda x: siglip_layer(block, x, bias_after), dynamic=False)


def siglip_padded(block: SiglipBlock):
    """The SigLIP layer compiled with Inductor's own stride padding, as the encoder was served before: the MLP's
    4304 columns padded to 4352 (fc2's bias then copied into its output, a ``badd`` product)."""
    return torch.compile(block.forward, dynamic=False)


SIGLIP_FORMS = {
    "padded": siglip_padded,
    "split": siglip_split,
    "split, flash": lambda block: siglip_split(block, ORDERS["flash_first"]),
    "split, efficient": lambda block: siglip_split(block, ORDERS["efficient_first"]),
    "flash inside": siglip_flash_inside,
    "contiguous": siglip_contiguous,
    "bias after": siglip_bias_after,
}
CODE_FORMS = ("padded", "bias after")  # forms whose generated library calls are recorded, beside the default order's
PRODUCTS = ("qkv", "out", "fc1", "fc2")  # the SigLIP layer's four products, each timed alone with its bias


def context(order):
    return sdpa_kernel(order, set_priority=True) if order else contextlib.nullcontext()


def graph_of(fn, inputs, order):
    """fn(*inputs) warmed up and captured under ``order``: (graph, static output)."""
    with torch.inference_mode(), context(order):
        for _ in range(3):
            fn(*inputs)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(*inputs)
    return graph, out


def library_calls(fn, x) -> list[str]:
    """The lines of the code Inductor generates for fn(x) that call a library (cuBLAS through
    ``extern_kernels``, ATen ops it did not generate, copies): which product takes which input, and what is
    copied before it. Compiles fn, so call it on a fresh torch.compile'd function."""
    from torch._inductor.utils import run_and_get_code

    with torch.inference_mode():
        _, codes = run_and_get_code(fn, x)
    keep = ("extern_kernels.", "torch.ops.aten.", ".copy_(", "as_strided")
    lines = (line.strip() for code in codes for line in code.splitlines())
    return [line[:200] for line in lines if not line.startswith("#") and any(k in line for k in keep)]


def measured(what: str, batch: int, order_name: str, graph, out, reference) -> dict:
    graph.replay()
    torch.cuda.synchronize()
    count, busy, names = kernel_times(graph)
    top = sorted(names.items(), key=lambda kv: -kv[1][1])[:6]
    row = {
        "what": what, "batch": batch, "order": order_name, "us": round(replay_ms(graph.replay) * 1e3, 1),
        "kernels": count, "busy_us": round(busy * 1e3, 1), "kinds": by_kind(names),
        "top": [(n[:90], round(ms * 1e3, 1), c) for n, (c, ms) in top],
        "rel": compare(out.float(), reference.float())["rel"] if reference is not None else 0.0,
    }  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,16", help="batch buckets (each item 2 views)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cfg = get_preset("pi0")
    torch.manual_seed(0)
    vision = SiglipBlock(cfg.vision).to(DEVICE, torch.bfloat16).eval()
    prefix = GemmaBlock(cfg.prefix).to(DEVICE, torch.bfloat16).eval()
    for module in (vision, prefix):
        for p in module.parameters():
            p.data.normal_(0, p.shape[-1] ** -0.5)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        x = torch.randn(2 * batch, cfg.vision.tokens_per_view, cfg.vision.width, device=DEVICE, dtype=torch.bfloat16)
        reference = None
        for name, order in ORDERS.items():
            torch._dynamo.reset()
            block = torch.compile(vision.forward, dynamic=False, options=UNPADDED)  # as Encoder.compile_targets
            with context(order):
                calls = library_calls(block, x) if order is None else []
                graph, out = graph_of(block, (x,), order)
            rows.append(measured("siglip layer", batch, name, graph, out, reference) | {"calls": calls})
            reference = out.clone() if reference is None else reference
        for name, form in SIGLIP_FORMS.items():
            torch._dynamo.reset()
            try:
                compiled = form(vision)
                calls = library_calls(compiled, x) if name in CODE_FORMS else []
                graph, out = graph_of(compiled, (x,), None)
            except Exception as exc:  # noqa: BLE001 - a form torch cannot compile or capture: say so, go on
                print(f"siglip layer {batch} {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                continue
            rows.append(measured("siglip layer", batch, name, graph, out, reference) | {"calls": calls})
        for name in PRODUCTS:  # which product's bias cuBLAS adds in its epilogue, and which it is copied for
            linear = getattr(vision, name)
            h = torch.randn(x.shape[0] * x.shape[1], linear.in_features, device=DEVICE, dtype=torch.bfloat16)
            graph, out = graph_of(linear, (h,), None)
            rows.append(measured(f"siglip {name}", batch, "eager", graph, out, None))
        with torch.inference_mode():
            qkv = siglip_qkv(vision, x)
        sdpa, reference = torch.nn.functional.scaled_dot_product_attention, None
        for name, order in ORDERS.items():
            graph, out = graph_of(sdpa, tuple(qkv), order)
            rows.append(measured("siglip sdpa", batch, name, graph, out, reference))
            reference = out.clone() if reference is None else reference
        p = 2 * cfg.vision.tokens_per_view + 48
        h = torch.randn(batch, p, cfg.prefix.width, device=DEVICE, dtype=torch.bfloat16)
        mask = torch.ones(batch, p, dtype=torch.bool, device=DEVICE)
        mask[:, -30:] = False  # a prompt shorter than its padding
        cos, sin = rope_tables(torch.cumsum(mask.long(), 1) - 1, cfg.prefix.head_dim, h.dtype)
        bias = attention_bias(mask[:, None, :], cfg.prefix.num_heads // cfg.prefix.num_kv_heads, h.dtype, p)
        with torch.inference_mode():
            q, k, v = prefix.qkv(h, cos, sin)
            heads = q.shape[2]  # the queries as a slice of the rotated queries and keys, as qkv gave them before
            sliced = torch.cat([q, k.transpose(1, 2)], dim=2)[:, :, :heads]
        reference = None
        for name, order in ORDERS.items():
            if name == "flash_first":
                continue  # flash takes no additive bias: the same as the next order
            for form, queries in (("", q), (", q sliced", sliced)):
                graph, out = graph_of(attention, (queries, k, v, bias), order)
                rows.append(measured("prefix attention", batch, name + form, graph, out, reference))
                reference = out.clone() if reference is None else reference
    result = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'what':17} {'batch':>5} {'order':16} {'us':>9} {'kernels':>7} {'rel':>8}  by kind (calls, us)")
    for r in rows:
        kinds = ", ".join(f"{k} {c} {ms * 1e3:.0f}" for k, (c, ms) in r["kinds"].items())
        print(
            f"{r['what']:17} {r['batch']:5d} {r['order']:16} {r['us']:9.1f} {r['kernels']:7d} {r['rel']:8.2g}  {kinds}"
        )
    for r in rows:
        print(
            f"{r['what']} {r['batch']} {r['order']}: " + "; ".join(f"{n[:60]} {us} x{c}" for n, us, c in r["top"][:4])
        )
    for r in rows:
        for line in r.get("calls", []):
            print(f"{r['what']} {r['batch']} {r['order']} calls: {line}")


if __name__ == "__main__":
    main()
