"""The pi0-style policy in PyTorch: SigLIP-style vision, Gemma-style prefix, Gemma-style action expert.

Serving splits it in two:
- :class:`Encoder` (camera frames uint8, prompt token ids) -> per-layer prefix keys/values
  ``prefix_kv [B, depth, 2, kv_heads, P, head_dim]`` and the prefix validity ``prefix_mask [B, P]``;
- :class:`Decoder` (prefix_kv, prefix_mask, state, noise) -> ``actions [B, 50, 32]``, running all
  flow-matching Euler steps (t = 1 -> 0).

:meth:`Policy.forward_joint` is an independent monolithic formulation (prefix and suffix in one
sequence, recomputed at every step, as in training); tests check that the split equals it.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from vlaserve.interface import (
    ACTION_DIM,
    ACTION_HORIZON,
    DECODER,
    ENCODER,
    IMAGE_SIZE,
    IMAGES,
    NOISE,
    NUM_FLOW_STEPS,
    STATE,
    STATE_DIM,
    TOKENS,
)
from vlaserve.model.presets import GemmaConfig, PolicyConfig, VisionConfig

ROPE_BASE = 10_000.0
RMS_EPS = 1e-6


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in float32, scaled by (1 + weight)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32, scale = x.float(), 1.0 + self.weight.float()
        if torch.onnx.is_in_onnx_export():  # opset 17 has no RMSNormalization: spell it out
            normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + RMS_EPS)
            return (normed * scale).to(x.dtype)
        return F.rms_norm(x32, scale.shape, scale, RMS_EPS).to(x.dtype)  # one fused kernel where torch has one


def rope_tables(positions: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Real-valued rotary tables for integer positions [B, T] -> cos, sin [B, T, 1, head_dim].

    In the rotate-half form: rope(x) = x * cos + cat(x2, x1) * sin, with sin's first half negated
    (Gemma's layout, without complex numbers, which break ONNX Runtime)."""
    inv_freq = ROPE_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], -1)[:, :, None].to(dtype), torch.cat([-sin, sin], -1)[:, :, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the head dimension of x [B, T, heads, D] (tables from :func:`rope_tables`)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([x2, x1], dim=-1) * sin


def attention_bias(mask: torch.Tensor, groups: int, dtype: torch.dtype, keys: int) -> torch.Tensor:
    """Additive bias for :func:`attention` from a bool mask [B, T, S] (True = may attend), or [B, 1, S] for
    a mask shared by every query: [B, 1, T * groups, S] (or [B, 1, 1, S]), 0 or -inf.

    Made once per forward, not per layer: SDPA would otherwise convert a bool mask in every call. The
    key dimension is stored padded to a multiple of 16 so that the memory-efficient kernel takes the
    bias as it is instead of padding a copy each time. ``keys`` is S as a plain int: sizes read from
    tensors are traced, and arithmetic on them in a trace runs on tensors (a device sync inside CUDA-graph
    capture), so no size below is computed from a tensor's shape."""
    b, t, s = mask.shape
    if t > 1:
        mask = mask[:, :, None, :].expand(-1, -1, groups, -1).reshape(b, -1, s)
    mask = mask[:, None]
    if torch.onnx.is_in_onnx_export():
        return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
    padded = -(-keys // 16) * 16
    bias = torch.full((b, 1, mask.shape[2], padded), float("-inf"), dtype=dtype, device=mask.device)
    return bias[..., :s].masked_fill_(mask, 0.0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention with the query heads of each key/value head folded into the query axis, so
    that keys and values are never copied per head. q [B,T,H,D]; k, v [B,Hkv,S,D]; bias from
    :func:`attention_bias` with groups = H / Hkv. Returns [B, T, H * D].

    SDPA, unless :func:`attention_override` has put another implementation in place."""
    if _attention_impl is not None:
        return _attention_impl(q, k, v, bias)
    b, t, _, d = q.shape
    hkv = k.shape[1]
    q = q.reshape(b, t, hkv, -1, d).permute(0, 2, 1, 3, 4).reshape(b, hkv, -1, d)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return out.reshape(b, hkv, t, -1, d).permute(0, 2, 1, 3, 4).reshape(b, t, -1)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`attention` written out: two batched matmuls and a float32 softmax. Compiled (Inductor fuses
    the scale, the bias and the softmax into one kernel) it beats every SDPA kernel for pi0's decoder at
    small batches, where a few hundred queries leave those kernels a dozen thread blocks on the H200."""
    b, t, _, d = q.shape
    hkv = k.shape[1]
    q = q.reshape(b, t, hkv, -1, d).permute(0, 2, 1, 3, 4).reshape(b, hkv, -1, d)
    scores = (q @ k.transpose(-1, -2)).float() * d**-0.5 + bias.float()
    out = scores.softmax(-1).to(v.dtype) @ v
    return out.reshape(b, hkv, t, -1, d).permute(0, 2, 1, 3, 4).reshape(b, t, -1)


_attention_impl = None  # set only inside attention_override(); tracing and export always see SDPA


@contextlib.contextmanager
def attention_override(impl):
    """Within the block, :func:`attention` calls ``impl`` (same arguments) instead of SDPA."""
    global _attention_impl
    before, _attention_impl = _attention_impl, impl
    try:
        yield
    finally:
        _attention_impl = before


class GemmaBlock(nn.Module):
    """One Gemma decoder layer, split so that two of them can share one attention (prefix + expert)."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.cfg = cfg
        self.input_norm = RMSNorm(cfg.width)
        # q, k and v in one matmul; gate and up in one matmul (fewer, larger kernels)
        self.qkv_proj = nn.Linear(cfg.width, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)
        self.mlp_norm = RMSNorm(cfg.width)
        self.gate_up_proj = nn.Linear(cfg.width, 2 * cfg.mlp_dim, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_dim, cfg.width, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Queries [B,T,H,D] and keys/values [B,Hkv,T,D] of x [B,T,W], with RoPE on q and k. The queries come
        out as a tensor of their own, so that :func:`attention` folds their heads into rows without a copy
        (a strided copy of the queries cost 45 us a prefix layer at batch 16 on the H200; compiled, the keys'
        rotation is then a small kernel of its own; docs/BENCHMARKS.md)."""
        b, t, _ = x.shape
        h, hkv, d = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
        qkv = self.qkv_proj(self.input_norm(x)).view(b, t, h + 2 * hkv, d)
        q = apply_rope(qkv[:, :, :h], cos, sin)
        k = apply_rope(qkv[:, :, h : h + hkv], cos, sin)
        return q, k.transpose(1, 2), qkv[:, :, h + hkv :].transpose(1, 2)

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual attention output, then the GeGLU MLP (tanh GELU). attn is [B, T, H * D]."""
        x = x + self.o_proj(attn)
        gate, up = self.gate_up_proj(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.gelu(gate, approximate="tanh") * up)


class SiglipBlock(nn.Module):
    """A pre-norm ViT layer as in SigLIP (LayerNorm, biased projections, tanh-GELU MLP)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.out = nn.Linear(cfg.width, cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, w))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class VisionTower(nn.Module):
    """Camera frames uint8 [N, 224, 224, 3] -> image tokens [N, tokens_per_view, vision width]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.tokens_per_view, cfg.width))
        self.blocks = nn.ModuleList(SiglipBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        dtype, p = self.patch_embed.weight.dtype, self.cfg.patch_size
        # Normalization lives in the model: uint8 [0, 255] -> [-1, 1].
        x = frames.to(dtype) * (2.0 / 255.0) - 1.0  # NHWC
        factor = IMAGE_SIZE // self.cfg.image_size
        if factor > 1:
            x = F.avg_pool2d(x.permute(0, 3, 1, 2), factor).permute(0, 2, 3, 1)
        # The patch embedding as one matmul over non-overlapping patches (equal to the strided conv, whose
        # weights it uses): no cuDNN call, which CUDA-graph capture does not survive.
        g = self.cfg.image_size // p  # patches per side (config ints: no arithmetic on traced sizes)
        patches = x.reshape(-1, g, p, g, p, 3).permute(0, 1, 3, 5, 2, 4).reshape(-1, g * g, 3 * p * p)
        x = F.linear(patches, self.patch_embed.weight.flatten(1), self.patch_embed.bias) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """pi0's sine/cosine embedding of the flow time, periods 4e-3 .. 4.0. t [B] -> [B, dim] (float32)."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float32, device=t.device)
    period = 4e-3 * (4.0 / 4e-3) ** fraction
    angles = t.float()[:, None] * (2.0 * math.pi / period)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Policy(nn.Module):
    """All weights of the policy, and the monolithic reference forward."""

    def __init__(self, cfg: PolicyConfig):
        super().__init__()
        self.cfg = cfg
        p, e = cfg.prefix, cfg.expert
        self.vision = VisionTower(cfg.vision)
        self.image_proj = nn.Linear(cfg.vision.width, p.width)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, p.width)
        self.prefix_layers = nn.ModuleList(GemmaBlock(p) for _ in range(p.depth))
        self.expert_layers = nn.ModuleList(GemmaBlock(e) for _ in range(e.depth))
        self.expert_norm = RMSNorm(e.width)
        self.state_proj = nn.Linear(STATE_DIM, e.width)
        self.action_in_proj = nn.Linear(ACTION_DIM, e.width)
        self.action_time_mlp_in = nn.Linear(2 * e.width, e.width)
        self.action_time_mlp_out = nn.Linear(e.width, e.width)
        self.action_out_proj = nn.Linear(e.width, ACTION_DIM)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def init_weights(self, seed: int) -> Policy:
        """Seeded random weights at a scale that keeps activations of order one at any width."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in self.modules():  # norms keep their constructor values (identity scale)
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    fan_in = module.weight[0].numel()
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / math.sqrt(fan_in))
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.Embedding):  # unit scale after Gemma's sqrt(width) factor
                    module.weight.copy_(
                        torch.randn(module.weight.shape, generator=gen) / math.sqrt(module.embedding_dim)
                    )
            self.vision.pos_embed.copy_(torch.randn(self.vision.pos_embed.shape, generator=gen) * 0.02)
        return self

    # ---- prefix -------------------------------------------------------------------------------
    def embed_prefix(self, images: torch.Tensor, tokens: torch.Tensor):
        """Prefix embeddings [B,P,W], validity [B,P] (bool), positions [B,P]. Only the first
        ``cfg.prompt_tokens`` token ids are computed on: past them the request holds padding (the runner
        refuses a prompt that reaches further), so the prefix carries no padding it need not."""
        tokens = tokens[:, : self.cfg.prompt_tokens]
        b, views = images.shape[:2]
        img = self.image_proj(self.vision(images.reshape(b * views, *images.shape[2:])))
        img = img.reshape(b, -1, img.shape[-1])
        lang = self.embed_tokens(tokens.long()) * math.sqrt(self.cfg.prefix.width)
        x = torch.cat([img, lang.to(img.dtype)], dim=1)
        mask = torch.cat([torch.ones(img.shape[:2], dtype=torch.bool, device=x.device), tokens != 0], dim=1)
        return x, mask, torch.cumsum(mask.long(), dim=1) - 1

    def encode(self, images: torch.Tensor, tokens: torch.Tensor):
        """The encoder: -> prefix_kv [B, depth, 2, kv_heads, P, head_dim], prefix_mask [B, P]."""
        x, mask, positions = self.embed_prefix(images, tokens)
        p = self.cfg.prefix
        cos, sin = rope_tables(positions, p.head_dim, x.dtype)
        # Every prefix token attends to every valid prefix token (bidirectional); padded queries
        # attend too, so no row is empty, but nothing attends to them.
        bias = attention_bias(mask[:, None, :], p.num_heads // p.num_kv_heads, x.dtype, self.cfg.prefix_len)
        keys, values = [], []
        last = len(self.prefix_layers) - 1
        for i, layer in enumerate(self.prefix_layers):
            q, k, v = layer.qkv(x, cos, sin)
            keys.append(k)
            values.append(v)
            if i < last:  # the last layer's output is never read: only its keys/values are
                x = layer.finish(x, attention(q, k, v, bias))
        prefix_kv = torch.stack([torch.stack(keys, 1), torch.stack(values, 1)], dim=2)
        return prefix_kv, mask

    # ---- suffix (action expert) ------------------------------------------------------------------
    def suffix_mask(self, prefix_mask: torch.Tensor) -> torch.Tensor:
        """[B, S, P+S]: suffix tokens see valid prefix tokens; state sees itself; actions see state+actions."""
        b = prefix_mask.shape[0]
        s = 1 + ACTION_HORIZON
        block = torch.ones(s, s, dtype=torch.bool, device=prefix_mask.device)
        block[0, 1:] = False
        return torch.cat([prefix_mask[:, None, :].expand(b, s, -1), block.expand(b, s, s)], dim=2)

    def suffix_positions(self, prefix_mask: torch.Tensor) -> torch.Tensor:
        """Suffix positions continue from the number of valid prefix tokens."""
        n_valid = prefix_mask.long().sum(dim=1, keepdim=True)
        return n_valid + torch.arange(1 + ACTION_HORIZON, device=prefix_mask.device)[None]

    def embed_suffix(self, state: torch.Tensor, x_t: torch.Tensor, t: float) -> torch.Tensor:
        """[state token; action tokens with the time embedding] -> [B, 1 + H, expert width] (reference form)."""
        dtype = self.dtype
        state_tok = self.state_proj(state.to(dtype))[:, None]
        act = self.action_in_proj(x_t.to(dtype))
        t_vec = torch.full((x_t.shape[0],), t, dtype=torch.float32, device=x_t.device)
        temb = time_embedding(t_vec, act.shape[-1]).to(dtype)[:, None].expand_as(act)
        act = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(torch.cat([act, temb], dim=-1))))
        return torch.cat([state_tok, act], dim=1)

    def velocity(self, kv, x_suffix, cos, sin, bias) -> torch.Tensor:
        """One expert pass over the suffix, attending to the prefix keys/values layer by layer.

        ``kv`` is [B, depth, 2, Hkv, P + S, D] with the prefix part filled: each layer writes its suffix
        keys/values into the tail, instead of concatenating the whole prefix again at every step (in an
        ONNX export, where in-place writes do not translate, ``kv`` is the prefix alone and is concatenated)."""
        x, p = x_suffix, self.cfg.prefix_len
        for i, layer in enumerate(self.expert_layers):
            q, k, v = layer.qkv(x, cos, sin)
            if torch.onnx.is_in_onnx_export():
                k, v = torch.cat([kv[:, i, 0], k], dim=2), torch.cat([kv[:, i, 1], v], dim=2)
            else:
                kv[:, i, 0, :, p:] = k
                kv[:, i, 1, :, p:] = v
                k, v = kv[:, i, 0], kv[:, i, 1]
            x = layer.finish(x, attention(q, k, v, bias))
        return self.action_out_proj(self.expert_norm(x)[:, 1:]).float()

    def decode(self, prefix_kv, prefix_mask, state, noise) -> torch.Tensor:
        """The decoder: Euler integration of the flow from noise (t=1) to actions (t=0).

        Equal to :meth:`embed_suffix` + :meth:`velocity` per step, with everything that does not change
        between steps done once: the masks, RoPE tables, the state token, and the time embedding's
        share of the action-time MLP (its input layer split into an action half and a time half)."""
        e, dtype = self.cfg.expert, self.dtype
        positions = self.suffix_positions(prefix_mask)
        cos, sin = rope_tables(positions, e.head_dim, dtype)
        keys = self.cfg.prefix_len + 1 + ACTION_HORIZON
        bias = attention_bias(self.suffix_mask(prefix_mask), e.num_heads // e.num_kv_heads, dtype, keys)
        if torch.onnx.is_in_onnx_export():
            kv = prefix_kv.to(dtype)
        else:
            b, depth, _, hkv, p, d = prefix_kv.shape
            kv = prefix_kv.new_empty((b, depth, 2, hkv, keys, d), dtype=dtype)
            kv[:, :, :, :, :p] = prefix_kv
        state_tok = self.state_proj(state.to(dtype))[:, None]
        dt = -1.0 / NUM_FLOW_STEPS
        # 1 + step * dt as Python computes it (float64, then float32), made on the device: no host copy
        times = (1.0 + dt * torch.arange(NUM_FLOW_STEPS, dtype=torch.float64, device=noise.device)).float()
        w_act, w_time = self.action_time_mlp_in.weight.chunk(2, dim=1)
        time_in = F.linear(time_embedding(times, e.width).to(dtype), w_time, self.action_time_mlp_in.bias)
        x_t = noise.float()
        for step in range(NUM_FLOW_STEPS):
            act = F.linear(self.action_in_proj(x_t.to(dtype)), w_act) + time_in[step]
            act = self.action_time_mlp_out(F.silu(act))
            x_t = x_t + dt * self.velocity(kv, torch.cat([state_tok, act], dim=1), cos, sin, bias)
        return x_t

    def forward(self, images, tokens, state, noise) -> torch.Tensor:
        """Encoder then decoder (what the served ensemble computes)."""
        prefix_kv, prefix_mask = self.encode(images, tokens)
        return self.decode(prefix_kv, prefix_mask, state, noise)

    def forward_joint(self, images, tokens, state, noise) -> torch.Tensor:
        """Monolithic reference: prefix and suffix as one sequence, recomputed at every Euler step."""
        prefix, prefix_mask, prefix_pos = self.embed_prefix(images, tokens)
        b, p = prefix_mask.shape
        s = 1 + ACTION_HORIZON
        positions = torch.cat([prefix_pos, self.suffix_positions(prefix_mask)], dim=1)
        cos, sin = rope_tables(positions, self.cfg.prefix.head_dim, self.dtype)
        full = torch.zeros(b, p + s, p + s, dtype=torch.bool)
        full[:, :p, :p] = prefix_mask[:, None, :]
        full[:, p:, :] = self.suffix_mask(prefix_mask)
        bias = attention_bias(full, self.cfg.prefix.num_heads // self.cfg.prefix.num_kv_heads, self.dtype, p + s)
        x_t = noise.float()
        dt = -1.0 / NUM_FLOW_STEPS
        for step in range(NUM_FLOW_STEPS):
            xp, xs = prefix, self.embed_suffix(state, x_t, 1.0 + step * dt)
            for pre, exp in zip(self.prefix_layers, self.expert_layers):
                qp, kp, vp = pre.qkv(xp, cos[:, :p], sin[:, :p])
                qs, ks, vs = exp.qkv(xs, cos[:, p:], sin[:, p:])
                out = attention(torch.cat([qp, qs], 1), torch.cat([kp, ks], 2), torch.cat([vp, vs], 2), bias)
                xp, xs = pre.finish(xp, out[:, :p]), exp.finish(xs, out[:, p:])
            x_t = x_t + dt * self.action_out_proj(self.expert_norm(xs)[:, 1:]).float()
        return x_t


ENCODER_PARTS = ("vision", "image_proj", "embed_tokens", "prefix_layers")
DECODER_PARTS = ("expert_layers", "expert_norm", "state_proj", "action_in_proj", "action_time_mlp_in",
                 "action_time_mlp_out", "action_out_proj")  # fmt: skip


def part_of(policy: Policy, keep: tuple[str, ...]) -> Policy:
    """A view of ``policy`` holding only the submodules in ``keep`` (weights shared, not copied), so that
    an exported encoder carries no action-expert weights and a decoder no vision or prefix weights."""
    part = copy.copy(policy)
    part._modules = {name: (module if name in keep else None) for name, module in policy._modules.items()}
    return part


UNPADDED = {"comprehensive_padding": False}  # Inductor: intermediates keep their natural strides


class Encoder(nn.Module):
    """The served encoder: (images uint8 [B,V,224,224,3], tokens int32 [B,48]) -> (prefix_kv, prefix_mask)."""

    def __init__(self, policy: Policy):
        super().__init__()
        self.policy = part_of(policy, ENCODER_PARTS)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        return self.policy.encode(images, tokens)

    @staticmethod
    def example_inputs(policy: Policy, request: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Its inputs, in ``forward``'s order, for a request as ``vlaserve.model.parity.random_request`` makes."""
        return request[IMAGES], request[TOKENS]

    def compile_targets(self):
        """(object, method name, Inductor settings) triples that ``compile: true`` compiles one layer at a time.
        The vision layers' intermediates keep their own strides: Inductor would pad the MLP's 4304 columns to
        4352, and fc2 given a padded input cannot have cuBLAS add its bias in the product's epilogue, so torch
        copies the bias into every output row first (on the H200 at bucket 16, a 57 us copy and a product
        15 us slower, per layer; docs/BENCHMARKS.md)."""
        yield from ((block, "forward", UNPADDED) for block in self.policy.vision.blocks)
        yield from ((layer, m, {}) for layer in self.policy.prefix_layers for m in ("qkv", "finish"))

    def fp8_targets(self):
        """(module, linear layer's attribute) pairs that ``precision: fp8`` computes in float8: the prefix
        layers' gate/up products. With random pi0 weights on the H200, fp8 there cost actions rel 0.026 against
        bf16 and made batch 16 1.19x faster; every linear layer in fp8 cost 0.10, the prefix's all 0.057,
        the vision tower's gave no speed (docs/BENCHMARKS.md)."""
        yield from ((layer, "gate_up_proj") for layer in self.policy.prefix_layers)


class Decoder(nn.Module):
    """The served decoder: (prefix_kv, prefix_mask, state fp32 [B,32], noise fp32 [B,50,32]) -> actions fp32."""

    def __init__(self, policy: Policy):
        super().__init__()
        self.policy = part_of(policy, DECODER_PARTS)

    def forward(self, prefix_kv, prefix_mask, state, noise) -> torch.Tensor:
        return self.policy.decode(prefix_kv, prefix_mask, state, noise)

    @staticmethod
    def example_inputs(policy: Policy, request: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            prefix_kv, prefix_mask = policy.encode(request[IMAGES], request[TOKENS])
        return prefix_kv, prefix_mask, request[STATE], request[NOISE]

    def compile_targets(self):
        yield from ((layer, m, {}) for layer in self.policy.expert_layers for m in ("qkv", "finish"))


# The module of each pipeline step (vlaserve.interface.PIPELINE), by model name: export traces it, the
# runner rebuilds it to compile its layers, the product screen walks it without weights. Each takes the
# whole policy and keeps its own part; its forward takes the step's inputs in the step's order.
STAGES: dict[str, type[nn.Module]] = {ENCODER: Encoder, DECODER: Decoder}


def build_policy(cfg: PolicyConfig, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Policy:
    """A policy with seeded random weights (drawn on ``device``), in eval mode."""
    with torch.device(device):
        policy = Policy(cfg)
    return policy.init_weights(seed).to(dtype).eval()
