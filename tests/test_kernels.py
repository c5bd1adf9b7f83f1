"""The fused decoder kernels (vlaserve.model.kernels) against the reference decoder, in Triton's CPU
interpreter (float32; the GPU runs in bfloat16 are benchmarks/decoder_kernels.py and fused_decoder.py)."""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT
from vlaserve.model.kernels import FusedDecoder, fused_forward

CHECK = """
import dataclasses, json, torch
from vlaserve.model.kernels import FusedDecoder, fused_forward
from vlaserve.model.parity import compare, random_request, randomize_biases_and_norms
from vlaserve.model.policy import Decoder, build_policy
from vlaserve.model.presets import get_preset

cfg = get_preset("tiny", 2)
# head_dim 32: the kernels' products need 16 columns per half head, as Triton's dot does on a GPU
cfg = dataclasses.replace(cfg, prefix=dataclasses.replace(cfg.prefix, head_dim=32),
                          expert=dataclasses.replace(cfg.expert, head_dim=32))
policy = build_policy(cfg, seed=0)
randomize_biases_and_norms(policy, seed=0)  # the seeded ones are zeros and identities: make every one count
rows = []
# BLOCK_K 16 gives the tiny expert's products (K 32 to 128) several steps, so that splitting K (the fifth
# number of the products added to the residual stream) really splits: 3 splits of the output projection's
# 128 (uneven) and 2 of the down projection's 64; 3 key splits of the attention; one split for every kind of
# the batch-2 case
split_k = {"qkv": (16, 16, 4, 1), "out": (16, 16, 4, 1, 3), "geglu": (16, 16, 4, 1), "down": (16, 16, 4, 1, 2),
           "step": (16, 16, 4, 1), "step_io": (16, 16, 4)}  # the flow step's over two column blocks and K steps
for batch, tiles in ((2, {"splits": 1, "out": (16, 16, 4, 1, 1), "down": (16, 16, 4, 1, 1)}), (1, {"splits": 3, **split_k})):
    r = random_request(batch, 2, cfg.vocab_size, seed=batch)
    with torch.no_grad():
        kv, mask = policy.encode(r["images"], r["tokens"])
        mask[0, 40:] = False  # a prompt shorter than the pad: masked prefix keys must not count
        ref = policy.decode(kv, mask, r["state"], r["noise"])
        if batch == 1:  # as the runtime offers it: the served module, inside fused_forward
            module = Decoder(policy)
            with fused_forward(module, tiles):
                out = module(kv, mask, r["state"], r["noise"])
            assert "forward" not in module.__dict__  # the module's own forward again
            # the key splits merged by a kernel of their own, in blocks of 16 and of 8 folded rows
            for merge_tiles in ({}, {"merge": (16, 4)}):
                merged = FusedDecoder(policy, {**tiles, **merge_tiles}, merge="kernel").decode(kv, mask, r["state"], r["noise"])
                rows.append({"batch": batch, "merge": f"kernel {merge_tiles}", **compare(merged, ref)})
        else:
            out = FusedDecoder(policy, tiles).decode(kv, mask, r["state"], r["noise"])
        other = policy.decode(kv, mask, r["state"], r["noise"] + 1)
    rows.append({"batch": batch, "tiles": str(tiles), **compare(out, ref), "moved": compare(out, other)["rel"]})
# two kv heads, 153 rows (batch 3) in row blocks of 128 (two, the second partly masked) for q/k/v, the output
# projection and gate/up and of 64 (three) for the down projection, K split for both residual products, three
# key splits, and a second call of the same decoder (its buffers reset by the last split of each tile, the
# sums made afresh); gate and up interleaved in the weight, one product of both
cfg2 = dataclasses.replace(cfg, prefix=dataclasses.replace(cfg.prefix, num_kv_heads=2),
                           expert=dataclasses.replace(cfg.expert, num_kv_heads=2))
policy2 = build_policy(cfg2, seed=1)
randomize_biases_and_norms(policy2, seed=1)
r = random_request(3, 2, cfg2.vocab_size, seed=3)
fused = FusedDecoder(policy2, {"splits": 3, "out": (16, 16, 4, 1, 3), "down": (16, 16, 4, 1, 2),
                              "block_m": {"qkv": 128, "out": 128, "geglu": 128}, "geglu_layout": "interleaved"})
with torch.no_grad():
    kv, mask = policy2.encode(r["images"], r["tokens"])
    ref = policy2.decode(kv, mask, r["state"], r["noise"])
    other = policy2.decode(kv, mask, r["state"], r["noise"] + 1)
    for call in (1, 2):
        out = fused.decode(kv, mask, r["state"], r["noise"])
        rows.append({"batch": 3, "call": call, "kv_heads": 2, **compare(out, ref), "moved": compare(out, other)["rel"]})
# 7 prompt positions (export --prompt-tokens 7): a prefix of 39 keys, a length no tile divides, in 3 key splits
cfg3 = dataclasses.replace(cfg, prompt_tokens=7)
policy3 = build_policy(cfg3, seed=2)
randomize_biases_and_norms(policy3, seed=2)
r = random_request(2, 2, cfg3.vocab_size, seed=4, prompt_tokens=7)
with torch.no_grad():
    kv, mask = policy3.encode(r["images"], r["tokens"])
    assert kv.shape[-2] == 39
    ref = policy3.decode(kv, mask, r["state"], r["noise"])
    out = FusedDecoder(policy3, {"splits": 3, **{k: v for k, v in split_k.items() if k in ("qkv", "geglu")}}).decode(
        kv, mask, r["state"], r["noise"])
    other = policy3.decode(kv, mask, r["state"], r["noise"] + 1)
rows.append({"batch": 2, "prefix": 39, **compare(out, ref), "moved": compare(out, other)["rel"]})
print(json.dumps(rows))
"""


def test_fused_decoder_matches_the_reference_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert sum("merge" in row for row in rows) == 2 and sum(row.get("prefix") == 39 for row in rows) == 1
    for row in rows:
        assert row["rel"] < 1e-5, row  # float32 throughout: the same arithmetic up to summation order
        assert row.get("moved", 1.0) > 1e-2, row  # against other noise's actions it differs: the check can fail


def test_a_choice_that_fails_to_capture_is_skipped_not_fatal():
    """A graph choice raising something other than RuntimeError (Triton's OutOfResources is an Exception)
    is left out of that bucket and named; the default choice still has to capture."""
    import contextlib
    import types

    from vlaserve.runtimes import CudaGraphs

    class OutOfResources(Exception):  # noqa: N818 - named as Triton names it
        pass

    fake_torch = types.SimpleNamespace(
        cuda=types.SimpleNamespace(graph_pool_handle=lambda: None, synchronize=lambda *a: None)
    )
    graphs = CudaGraphs(
        fake_torch, None, "cuda:0", {"default": contextlib.nullcontext, "fused": contextlib.nullcontext}
    )
    calls = []

    def capture_one(static_inputs):
        calls.append(len(calls))
        if len(calls) == 2:  # the second choice, "fused"
            raise OutOfResources("out of resource: shared memory")
        return f"graph{len(calls)}", ["out"]

    graphs._capture_one, graphs._replay_ms = capture_one, lambda graph: 1.0
    graphs.capture([[0, 0]])
    assert graphs.chosen[2] == "default" and "OutOfResources" in graphs.failed[2]["fused"]
    calls.clear()
    graphs._capture_one = lambda static_inputs: (_ for _ in ()).throw(OutOfResources("default fails"))
    try:
        graphs.capture([[0]])
    except OutOfResources:
        pass
    else:
        raise AssertionError("a default choice that cannot capture must fail the capture")


def test_fused_kernels_refuse_a_head_too_small_for_the_gpu_products():
    from vlaserve.model.kernels import FusedDecoder
    from vlaserve.model.policy import build_policy
    from vlaserve.model.presets import get_preset

    try:
        FusedDecoder(build_policy(get_preset("tiny", 2)))  # head_dim 16
    except ValueError as exc:
        assert "head_dim 16" in str(exc)
    else:
        raise AssertionError("head_dim 16 must be refused")


def _head32_policy():
    import dataclasses

    from vlaserve.model.policy import build_policy
    from vlaserve.model.presets import get_preset

    cfg = get_preset("tiny", 2)
    cfg = dataclasses.replace(cfg, prefix=dataclasses.replace(cfg.prefix, head_dim=32),
                              expert=dataclasses.replace(cfg.expert, head_dim=32))  # fmt: skip
    return build_policy(cfg, seed=0)


def test_scaled_weights_live_as_long_as_the_policy_not_the_decoder():
    """A CUDA graph captured inside fused_forward reads the norm-scaled weights by address after the
    FusedDecoder is gone (the served decoder's graphs): they must stay with the policy."""
    import gc

    import torch

    from vlaserve.model import kernels
    from vlaserve.model.policy import Decoder

    policy = _head32_policy()
    module = Decoder(policy)
    with fused_forward(module):
        held = module.forward.__self__.scaled
    gc.collect()
    assert kernels._SCALED[policy.expert_layers] is held  # still there, the same tensors
    layer = policy.expert_layers[0]
    expected = layer.qkv_proj.weight * (1 + layer.input_norm.weight)[None, :]
    assert torch.allclose(held[0]["qkv_proj"], expected)
    assert FusedDecoder(policy).scaled is held  # made once for the layers the module's copy of the policy shares
    del held, module, policy, layer
    gc.collect()
    assert not kernels._SCALED  # and gone with them


def test_norm_products_refuse_a_split_of_k():
    policy = _head32_policy()
    for kind in ("qkv", "geglu"):
        try:
            FusedDecoder(policy, {kind: (16, 16, 4, 1, 2)})
        except ValueError as exc:
            assert kind in str(exc) and "does not split K" in str(exc)
        else:
            raise AssertionError(f"{kind} with a fifth number must be refused")


LAYER_KERNELS = ("_norm_qkv_kernel", "_attention_kernel", "_out_proj_kernel", "_norm_geglu_kernel", "_down_proj_kernel")
STEP_KERNELS = ("_step_io_kernel", "_action_time_kernel", "_action_out_kernel")  # each flow step's own


def small_pi0(depth: int):
    """A bfloat16 policy of pi0's widths with ``depth`` layers in the prefix and the expert (one in the vision
    tower) and a small vocabulary: quick to build, and its kernels' launches are pi0's."""
    import dataclasses

    import torch

    from vlaserve.model.policy import build_policy
    from vlaserve.model.presets import get_preset

    pi0 = get_preset("pi0", 2)
    cfg = dataclasses.replace(
        pi0, vocab_size=512, vision=dataclasses.replace(pi0.vision, depth=1),
        prefix=dataclasses.replace(pi0.prefix, depth=depth), expert=dataclasses.replace(pi0.expert, depth=depth),
    )  # fmt: skip
    return build_policy(cfg, seed=0, dtype=torch.bfloat16)


def record_launches(monkeypatch, names) -> list:
    """The kernels ``names`` of vlaserve.model.kernels replaced (through ``monkeypatch``) by recorders: each
    launch appends (kernel, grid, args, kwargs) to the list returned instead of running."""
    from vlaserve.model import kernels

    calls = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.fn, grid, args, kwargs))

    for name in names:
        monkeypatch.setattr(kernels, name, Recorder(getattr(kernels, name)))
    return calls


def zero_decode(policy, batch: int, tiles: dict | None = None) -> None:
    """One FusedDecoder call on all-zero inputs of ``batch`` (a one-layer prefix cache, every prefix token
    valid): with the kernels recorded (:func:`record_launches`), what it would launch."""
    import torch

    from vlaserve.model import kernels

    e, p = policy.cfg.expert, policy.cfg.prefix_len
    prefix_kv = torch.zeros((batch, 1, 2, e.num_kv_heads, p, e.head_dim), dtype=torch.bfloat16)
    kernels.FusedDecoder(policy, tiles).decode(
        prefix_kv, torch.ones((batch, p), dtype=torch.bool), torch.zeros((batch, 32)), torch.zeros((batch, 50, 32))
    )


def test_dependent_launch_kernels_compile_for_the_h200(monkeypatch):
    """With pdl "launch" and "prefetch", the five kernels as the fused decoder launches them for pi0's expert
    layer at batch 1 compile for sm_90 (ahead of time, with the wheel's ptxas: no GPU needed): each waits for
    the previous kernel before any load or store of global memory, then lets the next start; with "prefetch"
    it first asks the L2 cache for its weights (the attention: its prefix keys and values). With "off" they
    launch as before."""
    import re

    import torch

    from vlaserve.model import kernels

    policy = small_pi0(depth=1)
    e, p = policy.cfg.expert, policy.cfg.prefix_len

    def launches(pdl: str) -> list:
        with monkeypatch.context() as m:
            calls = record_launches(m, LAYER_KERNELS)
            fused = kernels.FusedDecoder(policy, pdl=pdl)
            prefix_kv = torch.zeros((1, 1, 2, e.num_kv_heads, p, e.head_dim), dtype=torch.bfloat16)
            kv, cos, sin, mask, scratch, squares = fused.prepare(prefix_kv, torch.ones((1, p), dtype=torch.bool))
            x = torch.zeros((1, 51, e.width), dtype=torch.bfloat16)
            fused.layer(0, x, kv, cos, sin, mask, scratch, squares[0])
        assert [fn.__name__ for fn, *_ in calls] == list(LAYER_KERNELS)
        return calls

    assert all("PDL" not in kw and "launch_pdl" not in kw for *_, kw in launches("off"))
    assert all(kw["PDL"] and kw["launch_pdl"] and "PREFETCH" not in kw for *_, kw in launches("launch"))
    memory = re.compile(r"^\s*(@%p\d+\s+)?(ld\.global|st\.global|atom\.|red\.|cp\.async)", re.M)
    for mode, (fn, _, args, kw) in [(m, call) for m in ("launch", "prefetch") for call in launches(m)]:
        compiled = compile_for_h200(fn, args, kw)
        ptx = compiled.asm["ptx"]
        assert compiled.metadata.launch_pdl and compiled.asm["cubin"], fn.__name__
        assert ptx.count("griddepcontrol.wait") == 1 and ptx.count("griddepcontrol.launch_dependents") == 1, fn.__name__
        wait = ptx.index("griddepcontrol.wait")
        assert wait < ptx.index("griddepcontrol.launch_dependents"), fn.__name__
        # nothing another kernel writes is read or written before the wait: only prefetches come first
        assert not memory.search(ptx[:wait]), (mode, fn.__name__, memory.search(ptx[:wait]).group(0))
        assert memory.search(ptx[wait:]), fn.__name__  # (the pattern does find them after it)
        if mode == "prefetch":
            assert "prefetch.global.L2" in ptx[:wait] and kw["PREFETCH"] >= 4, fn.__name__
        else:
            assert "prefetch" not in ptx, fn.__name__


def compile_for_h200(fn, args, kw):
    """A recorded launch of one of the fused kernels compiled ahead of time for sm_90 (no GPU needed)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    types = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32", torch.int8: "*i8"}
    signature, constants = {}, {}
    for i, param in enumerate(fn.params):
        if param.is_constexpr:
            signature[param.name], constants[param.name] = "constexpr", kw.get(param.name, param.default)
            continue
        value = kw[param.name] if param.name in kw else args[i] if i < len(args) else param.default
        if value is None:
            signature[param.name], constants[param.name] = "constexpr", None
        else:
            signature[param.name] = (
                types[value.dtype] if isinstance(value, torch.Tensor) else "i32" if isinstance(value, int) else "fp32"
            )
    options = {k: kw[k] for k in ("num_warps", "num_stages", "launch_pdl") if k in kw}
    return triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32), options=options)


def test_kernels_ask_the_l2_cache_for_later_weights_ahead(monkeypatch):
    """With ``ahead``, each kernel kind the schedule names asks the L2 cache, as it starts, for its share of the
    weights a later kernel reads: the schedule's target of the right layer (the last layer's reaching round to
    the first, for the next flow step), shared out over the launch's programs; the kernels compile for sm_90
    with the prefetches in them, and without ``ahead`` none has one."""
    import torch
    import triton

    from vlaserve.model import kernels

    policy = small_pi0(depth=2)
    e, p = policy.cfg.expert, policy.cfg.prefix_len
    monkeypatch.setattr(kernels, "_fence", lambda: True)  # as on a GPU: the schedule is refused in the interpreter

    def launches(ahead: str, layer: int) -> list:
        with monkeypatch.context() as m:
            calls = record_launches(m, LAYER_KERNELS)
            fused = kernels.FusedDecoder(policy, ahead=ahead)
            prefix_kv = torch.zeros((1, 2, 2, e.num_kv_heads, p, e.head_dim), dtype=torch.bfloat16)
            kv, cos, sin, mask, scratch, squares = fused.prepare(prefix_kv, torch.ones((1, p), dtype=torch.bool))
            fused.layer(
                layer, torch.zeros((1, 51, e.width), dtype=torch.bfloat16), kv, cos, sin, mask, scratch, squares[0]
            )
        return fused, calls

    _, calls = launches("off", 0)
    assert all("AHEAD" not in kw for *_, kw in calls)
    for schedule in ("next", "early"):
        for layer in (0, 1):
            fused, calls = launches(schedule, layer)
            for fn, grid, _, kw in calls:
                kind = kernels.KINDS[[c[0] for c in calls].index(fn)]
                target = kernels.AHEAD_SCHEDULES[schedule].get(kind)
                if target is None:
                    assert "AHEAD" not in kw, (schedule, kind)
                    continue
                weight = fused.weight(target[0], (layer + target[1]) % 2)
                assert kw["ahead_ptr"] is weight, (schedule, kind, layer)
                lines = weight.numel() * 2 // 128
                programs = triton.cdiv(lines, kw["AHEAD"])
                assert kw["ahead_lines"] == lines and programs <= torch.Size(grid).numel() < 2 * programs
    assert (
        fused.weight("qkv", 1) is fused.scaled[1]["qkv_proj"]
        and fused.weight("down", 0) is policy.expert_layers[0].down_proj.weight
    )
    _, calls = launches("next", 1)
    for fn, _, args, kw in calls:
        ptx = compile_for_h200(fn, args, kw).asm["ptx"]
        assert ("prefetch.global.L2::evict_last" in ptx) == ("AHEAD" in kw), fn.__name__


def test_flow_step_kernels_compile_for_the_h200(monkeypatch):
    """Each flow step's own kernels (the velocity and Euler update with the next input projection, the
    action-time MLP's two layers) as the fused decoder launches them for pi0 at batch 1, in bfloat16, compile
    for sm_90 (the interpreter runs float32 only): three per step and one more after the last."""
    from vlaserve.interface import NUM_FLOW_STEPS
    from vlaserve.model import kernels

    policy = small_pi0(depth=1)
    calls = record_launches(monkeypatch, STEP_KERNELS)
    monkeypatch.setattr(kernels.FusedDecoder, "layer", lambda *args, **kwargs: None)
    zero_decode(policy, 1)
    assert [fn.__name__ for fn, *_ in calls] == [*STEP_KERNELS * NUM_FLOW_STEPS, "_step_io_kernel"]
    outs = [(kw["OUT"], kw["IN"]) for fn, *_, kw in calls if fn.__name__ == "_step_io_kernel"]
    assert outs == [(False, True), *[(True, True)] * (NUM_FLOW_STEPS - 1), (True, False)]
    for fn, _, args, kw in calls[:4] + calls[-1:]:  # the first step's three, a later step's first, the last
        assert compile_for_h200(fn, args, kw).asm["cubin"], fn.__name__


def test_each_product_takes_its_own_row_block(monkeypatch):
    """Above 64 rows each product kernel gets the row block its kind's entry of ``block_m`` names (64 where it
    names none), with a grid of as many row blocks; a kind whose setting is overridden keeps the default's
    row block only if the override names it. The 128-row defaults compile for sm_90 (their pipelines fit)."""
    policy = small_pi0(depth=1)
    calls = record_launches(monkeypatch, (*LAYER_KERNELS, *STEP_KERNELS))

    def blocks(batch: int, tiles: dict | None = None) -> dict:
        calls.clear()
        zero_decode(policy, batch, tiles)
        found = {}
        for fn, grid, args, kw in calls[3:8]:  # the first flow step's expert layer
            if fn.__name__ != "_attention_kernel":
                splits = kw.get("SPLITS", 1)
                assert grid[0] == -(-batch * 51 // kw["BLOCK_M"]) * splits, (fn.__name__, grid, kw["BLOCK_M"])
                found[fn.__name__] = (kw["BLOCK_M"], (fn, args, kw))
        return found

    at16 = blocks(16)  # TILES_BY_ROWS above 612 rows: down in blocks of 128
    assert {name: bm for name, (bm, _) in at16.items()} == {
        "_norm_qkv_kernel": 64, "_out_proj_kernel": 64, "_norm_geglu_kernel": 64, "_down_proj_kernel": 128,
    }  # fmt: skip
    assert compile_for_h200(*at16["_down_proj_kernel"][1]).asm["cubin"]
    at8 = blocks(8)  # up to 408 rows: gate/up in blocks of 128
    assert at8["_norm_geglu_kernel"][0] == 128 and at8["_down_proj_kernel"][0] == 64
    assert compile_for_h200(*at8["_norm_geglu_kernel"][1]).asm["cubin"]
    assert blocks(8, {"geglu": (64, 64, 4, 3)})["_norm_geglu_kernel"][0] == 64  # overridden, no block named
    both = blocks(16, {"block_m": {"qkv": 128}})  # one kind's block named: the others' defaults stay
    assert both["_norm_qkv_kernel"][0] == 128 and both["_down_proj_kernel"][0] == 128
    assert blocks(1)["_norm_geglu_kernel"][0] == 64  # 51 rows: one block of 64
    fn, args, kw = blocks(16, {"geglu_layout": "interleaved"})["_norm_geglu_kernel"][1]  # one product of both
    assert kw["INTERLEAVED"] and compile_for_h200(fn, args, kw).asm["cubin"]


def test_the_two_attentions_take_their_own_launch_settings(monkeypatch):
    """The fused decoder's attention (its mask computed in the kernel) launches with the "attention" and
    "splits" of TILES_BY_ROWS (at batch 2 its own, split in two, not batch 4's); triton_attention (an additive
    bias per block of keys) with those under "bias" where there are, unless its caller names its own: their
    fastest differ above 64 rows. The fused one's 64-row setting compiles for sm_90."""
    import torch

    from vlaserve.model import kernels

    policy = small_pi0(depth=1)
    e, p = policy.cfg.expert, policy.cfg.prefix_len
    calls = record_launches(monkeypatch, (*LAYER_KERNELS, *STEP_KERNELS))

    def setting(kw: dict) -> tuple:  # an attention launch's (rows, keys, warps, stages, key splits)
        return kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"], kw["SPLITS"]

    for batch in (1, 2, 4, 8, 16):
        tiles = kernels.tiles_for(batch * 51)
        fused_tiles = (*tiles["attention"], tiles["splits"])
        bias_tiles = {**tiles, **tiles["bias"]}
        bias_tiles = (*bias_tiles["attention"], bias_tiles["splits"])
        calls.clear()
        zero_decode(policy, batch)
        fn, grid, args, kw = next(c for c in calls if c[0].__name__ == "_attention_kernel")
        launched = setting(kw)
        assert launched[:4] == fused_tiles[:4] and (fused_tiles[4] == 0 or launched[4] == fused_tiles[4]), launched
        if batch == 2:
            assert launched == (16, 64, 4, 2, 2)
        if batch == 16:
            assert launched == (64, 32, 4, 3, 1)
            assert compile_for_h200(fn, args, kw).asm["cubin"]
        calls.clear()
        q = torch.zeros((batch, 51, e.num_heads, e.head_dim), dtype=torch.bfloat16)
        kv = torch.zeros((batch, 2, e.num_kv_heads, p + 51, e.head_dim), dtype=torch.bfloat16)
        bias = torch.zeros((batch, 1, 51 * e.num_heads // e.num_kv_heads, p + 51), dtype=torch.bfloat16)
        kernels.triton_attention(q, kv[:, 0], kv[:, 1], bias)
        ((fn, grid, args, kw),) = calls
        launched = setting(kw)
        assert launched[:4] == bias_tiles[:4] and (bias_tiles[4] == 0 or launched[4] == bias_tiles[4]), launched
        assert kw["BIAS"]
    assert kernels.tiles_for(16 * 51)["bias"]["attention"] == (32, 64, 4, 2)
    calls.clear()  # a caller's settings (benchmarks/attention_bench.py's sweep) win over "bias"
    kernels.triton_attention(q, kv[:, 0], kv[:, 1], bias, tiles={"attention": (64, 32, 4, 3), "splits": 1})
    ((fn, grid, args, kw),) = calls
    assert setting(kw) == (64, 32, 4, 3, 1)


def test_merge_in_a_kernel_of_its_own_compiles_for_the_h200(monkeypatch):
    """With merge "kernel", pi0's attention at batch 1 (key splits) launches without the last split's fence and
    arrival count, and the merge kernel after it over the same partial results; both compile for sm_90."""
    import torch

    from vlaserve.model import kernels

    policy = small_pi0(depth=1)
    e, p = policy.cfg.expert, policy.cfg.prefix_len
    calls = record_launches(monkeypatch, ("_attention_kernel", "_merge_kernel"))
    fused = kernels.FusedDecoder(policy, merge="kernel")
    prefix_kv = torch.zeros((1, 1, 2, e.num_kv_heads, p, e.head_dim), dtype=torch.bfloat16)
    kv, cos, sin, mask, scratch, squares = fused.prepare(prefix_kv, torch.ones((1, p), dtype=torch.bool))
    x = torch.zeros((1, 51, e.width), dtype=torch.bfloat16)
    fused.layer(0, x, kv, cos, sin, mask, scratch, squares[0], kinds=("attention",))
    (attention, _, a_args, a_kw), (merge, grid, m_args, m_kw) = calls
    assert attention.__name__ == "_attention_kernel" and merge.__name__ == "_merge_kernel"
    assert a_kw["SPLITS"] > 1 and a_kw["MERGE"] is False and m_kw["SPLITS"] == a_kw["SPLITS"]
    assert m_args[0] is a_args[6] and m_args[1] is scratch["attn"]  # the partial results, into the output
    rows, _ = kernels.tiles_for(51)["merge"]
    assert grid == (e.num_kv_heads, -(-51 * (e.num_heads // e.num_kv_heads) // rows))
    ptx = compile_for_h200(attention, a_args, a_kw).asm["ptx"]
    assert "fence.acq_rel" not in ptx and "atom" not in ptx
    assert compile_for_h200(merge, m_args, m_kw).asm["cubin"]


PERSISTENT_CHECK = """
import json, torch
from benchmarks import persistent_probe as p
rows = [p.empty_case(1, 3, 10, timed=False)]
for programs, spin_limit in ((1, 10), (2, 3)):
    rows.append(p.product_case(64, 32, 16, 16, 4, 1, rows=51, programs=programs, spin_limit=spin_limit, timed=False,
                               dtype=torch.float32))
rows.append(p.product_case(16, 64, 16, 16, 4, 1, rows=51, programs=0, spin_limit=10, timed=False,
                           dtype=torch.float32, ahead_k=32))
print(json.dumps(rows))
"""


def test_persistent_probe_runs_in_the_interpreter_and_compiles_for_the_h200():
    """benchmarks/persistent_probe.py: one program passes its barriers and computes every layer's product as
    the per-layer launches do; with two programs, which Triton's interpreter runs one after the other, the
    first gives up at each of the 18 barriers instead of waiting forever, says so, and its layers then read
    rows the other has not written: the outputs differ, as they would where a barrier let a layer start early.
    With the next layer's first weight columns loaded at each barrier (between arriving and waiting), it
    computes the same; an AHEAD_K the kernel cannot take is refused. Its kernels, barrier included, compile for
    sm_90."""
    import pytest
    import torch

    from benchmarks import persistent_probe as probe

    env = {**os.environ, "TRITON_INTERPRET": "1", "VLASERVE_BENCH_DEVICE": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", PERSISTENT_CHECK], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    empty, alone, two, ahead = json.loads(done.stdout.strip().splitlines()[-1])
    assert empty["gave_up"] == 0 and alone["gave_up"] == 0 and alone["equal"] and alone["last_layer_rms"] > 0.1
    assert two["gave_up"] == probe.LAYERS and not two["equal"]
    assert ahead["gave_up"] == 0 and ahead["equal"] and ahead["last_layer_rms"] > 0.1, ahead
    for ahead_k in (16, 48, 128):  # under one BLOCK_K of 32, not a power of two, over K of 64
        with pytest.raises(ValueError, match="ahead_k"):
            probe.product_case(16, 64, 16, 32, 4, 1, rows=51, programs=0, spin_limit=10, timed=False, ahead_k=ahead_k)
    acts, w = (torch.zeros(s, dtype=torch.bfloat16) for s in ((19, 64, 2560), (18, 2560, 1024)))
    count, gave_up = torch.zeros(1, dtype=torch.int32), torch.zeros(80, dtype=torch.int32)
    common = {"FENCE": True, "SPIN_LIMIT": 1000, "num_warps": 4}
    for fn, args, kw in (
        (probe._persistent_products_kernel, (acts, w, count, gave_up, 2560),
         {"K": 1024, "S": 2560, "LAYERS": 18, "BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64, "num_stages": 4, **common}),
        (probe._barriers_kernel, (gave_up, count, gave_up), {"PHASES": 180, "num_stages": 1, **common}),
        (probe._persistent_ahead_kernel, (acts, w, count, gave_up, 2560),
         {"K": 1024, "S": 2560, "LAYERS": 18, "BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 64, "AHEAD_K": 256,
          "num_stages": 4, **common}),
    ):  # fmt: skip
        ptx = compile_for_h200(fn, args, kw).asm["ptx"]
        assert "fence.acq_rel.gpu" in ptx and "atom" in ptx, fn.__name__


def compile_gluon_for_h200(fn, signature: dict, constants: dict, num_warps: int):
    """A Gluon kernel compiled ahead of time for sm_90 (no GPU needed), its pointers taken as 16-byte aligned
    as a launch on the GPU specializes them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = list(signature) + list(constants)
    aligned = {
        (i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if str(signature.get(n, "")).startswith("*")
    }
    source = GluonASTSource(fn, {**signature, **dict.fromkeys(constants, "constexpr")}, constants, aligned)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def test_stream_probe_reads_its_settings_and_its_kernel_compiles_for_the_h200():
    """benchmarks/stream_probe.py is written in Gluon, which has no CPU interpreter: it runs on the GPU only,
    where every form is checked against the plain Triton chain. Here: a setting's string gives its numbers
    and one the kernel cannot take is refused (one weight slot with queued products would wait forever for a
    tile it asks for only afterwards), on the command line too, before any GPU work. The default settings,
    one for each of the kernel's ways, compile for sm_90: the weights through the copy engine (TMA), the
    activations through asynchronous copies, the products as warp-group MMAs, each activation tile awaited
    with exactly the later copies still in flight. Over 18 layers it passes a grid-wide barrier (a GPU-wide
    fence, then an atomic count); one layer alone has none. With K split, each program adds its share with
    atomic additions."""
    import re

    import pytest
    import torch
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    from benchmarks import stream_probe as probe

    row = probe.parse_product("1024x2048:64x128s4a2w4k8q")
    assert row == {"n": 1024, "k": 2048, "block_n": 64, "block_k": 128, "stages": 4, "a_stages": 2, "warps": 4,
                   "splits": 8, "async": True}  # fmt: skip
    assert probe.shared_bytes(row) == 160 * 1024  # 4 weight tiles, 2 fp32 activation tiles, 2 bf16 ones
    assert probe.parse_product("8192x1024:64x64s8a16w4")["splits"] == 1
    for bad in ("8192x1024:64x64s8a16", "1000x1024:64x64s8a16w4", "1024x2048:64x128s4a2w4k32",
                "1024x2048:64x128s4a1w4q", "2560x1024:32x128s1a4w4q", "1024x1024:512x64s2a2w4"):  # fmt: skip
        with pytest.raises(ValueError):
            probe.parse_product(bad)
    done = subprocess.run(  # the command line says which setting, before any GPU work
        [sys.executable, "-m", "benchmarks.stream_probe", "--products", "8192x1024:64x64s8a16w4,1x2", "--out", "x"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "--products: '1x2': expected" in done.stderr, done.stderr[-2000:]

    # the defaults take each way: unsplit, unsplit queued, K split, K split queued
    assert {(probe.parse_product(d)["splits"] > 1, probe.parse_product(d)["async"]) for d in probe.DEFAULT_PRODUCTS} == {
        (False, False), (False, True), (True, False), (True, True)}  # fmt: skip
    for setting in probe.DEFAULT_PRODUCTS:
        p = probe.parse_product(setting)
        layout = gl.NVMMASharedLayout.get_default_for([p["block_n"], p["block_k"]], gl.bfloat16)
        weights = torch.zeros((18 * p["n"], p["k"]), dtype=torch.bfloat16)
        descriptor = TensorDescriptor.from_tensor(weights, [p["block_n"], p["block_k"]], layout)
        signature = {"acts_ptr": "*bf16", "acts32_ptr": "*fp32", "w_desc": mangle_type(descriptor),
                     "count_ptr": "*i32", "gave_up_ptr": "*i32", "first_layer": "i32", "N": "i32"}  # fmt: skip
        for layers in (1, 18):
            constants = {"K": p["k"], "S": max(p["n"], p["k"]), "LAYERS": layers, "BLOCK_N": p["block_n"],
                         "BLOCK_K": p["block_k"], "STAGES": p["stages"], "A_STAGES": p["a_stages"],
                         "SPLITS": p["splits"], "ASYNC": p["async"], "ROWS": 51, "SPIN_LIMIT": 1000,
                         "num_warps": p["warps"]}  # fmt: skip
            compiled = compile_gluon_for_h200(probe._stream_kernel, signature, constants, p["warps"])
            ptx = compiled.asm["ptx"]
            assert compiled.metadata.shared <= 227 * 1024 and compiled.metadata.shared >= probe.shared_bytes(p)
            for op in ("cp.async.bulk.tensor", "cp.async.cg.shared.global", "wgmma.mma_async"):
                assert op in ptx, (setting, layers, op)
            # each activation tile is awaited with exactly the groups committed after it still in flight
            waits = {int(w) for w in re.findall(r"cp\.async\.wait_group\s+(\d+)", ptx)}
            assert waits == {0, p["a_stages"] - 1 - p["async"]}, (setting, layers, waits)  # 0: at the layer's end
            barrier = "fence.acq_rel.gpu" in ptx and "atom.global.gpu.acq_rel.add.u32" in ptx
            assert barrier == (layers > 1), (setting, layers)
            assert bool(re.search(r"atom\.global\.gpu\.relaxed\.add(\.v\d)?\.f32", ptx)) == (p["splits"] > 1)


def test_fused_decoder_refuses_what_it_cannot_run(monkeypatch):
    """Unknown modes, weights the kernels cannot index as stored, and modes that need a GPU in the interpreter."""
    import dataclasses

    import pytest
    import torch

    from vlaserve.model.policy import build_policy
    from vlaserve.model.presets import get_preset

    cfg = get_preset("tiny", 2)
    cfg = dataclasses.replace(  # head_dim 32: the least the kernels take
        cfg, prefix=dataclasses.replace(cfg.prefix, head_dim=32), expert=dataclasses.replace(cfg.expert, head_dim=32)
    )
    policy = build_policy(cfg, seed=0)
    with pytest.raises(ValueError, match="one of"):
        FusedDecoder(policy, pdl="sometimes")
    with pytest.raises(ValueError, match="one of"):
        FusedDecoder(policy, ahead="sometimes")
    with pytest.raises(ValueError, match="one of"):
        FusedDecoder(policy, merge="none")  # the attention's output would not be merged
    with pytest.raises(ValueError, match="not combined"):
        FusedDecoder(policy, pdl="launch", merge="kernel")
    with pytest.raises(ValueError, match="merge takes"):
        FusedDecoder(policy, {"merge": (3, 4)})
    with pytest.raises(ValueError, match="geglu_layout"):
        FusedDecoder(policy, {"geglu_layout": "split"})
    for block_m in ({"attention": 128}, {"qkv": 96}, {"down": 32}, {"geglu": 256}, [("qkv", 128)]):
        with pytest.raises(ValueError, match="block_m maps"):
            FusedDecoder(policy, {"block_m": block_m})
    for module in (policy.expert_layers[0].o_proj, policy.action_time_mlp_in):  # the kernels index weights as stored
        stored = module.weight
        module.weight = torch.nn.Parameter(stored.t().contiguous().t())
        with pytest.raises(ValueError, match="is not contiguous"):
            FusedDecoder(policy)
        module.weight = stored
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="needs a GPU"):
        FusedDecoder(policy, pdl="launch")
    with pytest.raises(ValueError, match="needs a GPU"):
        FusedDecoder(policy, ahead="next")


TRITON_ATTENTION = """
import json, torch
from vlaserve.model.kernels import triton_attention
from vlaserve.model.policy import attention_bias, attention_math
from vlaserve.model.parity import compare

torch.manual_seed(0)
rows = []
# 2 items, 4 heads over 2 kv heads (2 folded per kv head), head_dim 32, 200 keys; 5 query tokens (one block of
# 16 folded rows, the launch setting up to 64 tokens) and 40 (80 tokens: three blocks of 32, the setting above);
# 2 key splits by default, 1 when the GPU is said to hold a single program
b, h, hkv, d, s = 2, 4, 2, 32, 200
for t in (5, 40):
    q = torch.randn(b, t, h + 2 * hkv, d)[:, :, :h]  # a view, as the layers' q is: rows contiguous, not the whole
    kv = torch.randn(b, 3, 2, hkv, s, d)[:, 1]  # [B, 2, Hkv, S, D] of a wider buffer, as the decoder's
    k, v = kv[:, 0], kv[:, 1]
    mask = torch.rand(b, t, s) > 0.3
    mask[:, :, 0] = True  # no empty row
    shared = torch.rand(b, 1, s) > 0.5
    shared[:, :, 0] = True
    for name, m in (("per query", mask), ("shared", shared)):
        bias = attention_bias(m, h // hkv, torch.float32, s)
        ref = attention_math(q, k, v, bias)
        for programs, merge in ((132, "last"), (132, "kernel"), (1, "last")):
            out = triton_attention(q, k, v, bias, target_programs=programs, merge=merge)
            rows.append({"tokens": t, "mask": name, "programs": programs, "merge": merge, **compare(out, ref),
                         "moved": compare(out, attention_math(q, k, v + 1, bias))["rel"]})
refused = []
for args in (
    (torch.randn(1, 2, 2, 24), torch.randn(1, 1, 8, 24), torch.randn(1, 1, 8, 24), torch.zeros(1, 1, 1, 8)),
    (torch.randn(2, 2, 2, 32), torch.randn(2, 1, 8, 32), torch.randn(2, 1, 8, 32), torch.zeros(1, 1, 1, 8)),
):
    try:
        triton_attention(*args)
    except ValueError as exc:
        refused.append(str(exc))
try:
    triton_attention(q, k, v, bias, merge="sometimes")
except ValueError as exc:
    refused.append(str(exc))
print(json.dumps({"rows": rows, "refused": refused}))
"""


def test_triton_attention_matches_the_reference_in_the_interpreter():
    """The attention kernel with a bias tensor (the compiled decoder's choice "triton_attention") against
    attention_math: both launch settings (up to and above 64 tokens), several row blocks, per-query and shared
    masks, split over the keys and not. A head_dim it cannot take, or a bias of another batch, is refused
    with a ValueError (the choice is then dropped at start, not served)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", TRITON_ATTENTION], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["rows"]) == 12, result
    for row in result["rows"]:
        assert row["rel"] < 1e-5, row
        assert row["moved"] > 1e-2, row
    assert "head_dim 24" in result["refused"][0] and "bias (1, 1, 1, 8)" in result["refused"][1], result["refused"]
    assert "merge 'sometimes'" in result["refused"][2], result["refused"]


GEGLU_CHECK = """
import json, torch
from benchmarks.geglu_gemm import geglu_matmul, reference, rel
torch.manual_seed(0)
rows = []
# an uneven row count (masked rows) and several column blocks; then K in several steps of 16
for m, k, f, setting in ((37, 64, 48, (16, 16, 32, 4, 1)), (16, 32, 64, (16, 32, 16, 4, 1))):
    a = torch.randn(m, k)
    gate_up = torch.randn(2 * f, k) / k**0.5
    out = geglu_matmul(a, gate_up, setting, group_m=2)
    rows.append({"rel": rel(out, reference(a, gate_up)), "swapped": rel(out, reference(a, gate_up.flip(0)))})
try:
    geglu_matmul(torch.randn(4, 64), torch.randn(2 * 40, 64), (16, 16, 32, 4, 1))
    rows.append({"misfit": "accepted"})
except ValueError as exc:
    rows.append({"misfit": str(exc)})
print(json.dumps(rows))
"""


def test_the_gate_up_product_with_geglu_in_its_epilogue_matches_the_reference_in_the_interpreter():
    """benchmarks/geglu_gemm.py's kernel (one program computes the same columns of gate and up, then GeGLU)
    against the product followed by GeGLU, in float32; a weight with gate and up swapped is far off, and
    40 columns in blocks of 16 are refused."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", GEGLU_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    *products, misfit = json.loads(done.stdout.strip().splitlines()[-1])
    for row in products:
        assert row["rel"] < 1e-5 and row["swapped"] > 0.5, row
    assert "do not fit blocks" in misfit["misfit"], misfit
