"""Semantics of the PyTorch policy (tiny preset): masking, batch independence, noise, split == monolithic."""

import pytest
import torch

from vlaserve.model.parity import random_request
from vlaserve.model.policy import Policy

ATOL = 1e-5


def run(policy, req):
    with torch.no_grad():
        return policy(req["images"], req["tokens"], req["state"], req["noise"])


def test_padding_tokens_do_not_change_actions(tiny_policy):
    req = random_request(2, 2, 1024, seed=1)
    tokens = torch.zeros_like(req["tokens"])
    tokens[:, :5] = torch.tensor([11, 22, 33, 44, 55], dtype=torch.int32)
    moved = torch.zeros_like(tokens)  # the same prompt, with padding before and between its tokens
    moved[:, [3, 4, 9, 20, 40]] = tokens[:, :5]
    base = run(tiny_policy, {**req, "tokens": tokens})
    assert torch.allclose(base, run(tiny_policy, {**req, "tokens": moved}), atol=ATOL)
    changed = tokens.clone()
    changed[:, 2] = 99  # a real token does change them: the check above is not vacuous
    assert (base - run(tiny_policy, {**req, "tokens": changed})).abs().max() > 1e-3


def test_fewer_prompt_positions_same_actions_shorter_prefix(tiny_policy):
    """A policy that computes on 8 prompt positions answers as the full one for prompts that fit (padding was all
    it left out), with a prefix 40 positions shorter; a prompt past 8 would differ, which the runner refuses."""
    import dataclasses

    short = Policy(dataclasses.replace(tiny_policy.cfg, prompt_tokens=8)).eval()
    short.load_state_dict(tiny_policy.state_dict())
    req = random_request(3, 2, 1024, seed=6, prompt_tokens=8)
    assert (req["tokens"][:, 8:] == 0).all() and (req["tokens"][:, 0] != 0).all()
    assert torch.allclose(run(short, req), run(tiny_policy, req), atol=ATOL)
    with torch.no_grad():
        full_kv, full_mask = tiny_policy.encode(req["images"], req["tokens"])
        kv, mask = short.encode(req["images"], req["tokens"])
    assert kv.shape[-2] == full_kv.shape[-2] - 40 == short.cfg.prefix_len
    assert torch.equal(mask, full_mask[:, :-40]) and torch.allclose(kv, full_kv[..., :-40, :], atol=ATOL)
    longer = req["tokens"].clone()
    longer[:, 20] = 7  # a 21st position: the full policy sees it, the short one leaves it out
    assert (run(tiny_policy, {**req, "tokens": longer}) - run(short, {**req, "tokens": longer})).abs().max() > 1e-3


def test_batch_items_are_independent(tiny_policy):
    req = random_request(4, 2, 1024, seed=2)
    together = run(tiny_policy, req)
    for i in range(4):
        alone = run(tiny_policy, {k: v[i : i + 1] for k, v in req.items()})
        assert torch.allclose(together[i : i + 1], alone, atol=ATOL)
    other = {k: v.clone() for k, v in req.items()}
    other["images"][1:] = 255 - other["images"][1:]
    other["state"][1:] += 1
    assert torch.allclose(run(tiny_policy, other)[0], together[0], atol=ATOL)


def test_same_noise_same_actions_different_noise_different_actions(tiny_policy):
    req = random_request(2, 2, 1024, seed=3)
    first, second = run(tiny_policy, req), run(tiny_policy, req)
    assert torch.equal(first, second)
    other = run(tiny_policy, {**req, "noise": torch.randn_like(req["noise"])})
    assert (first - other).abs().max() > 1e-2


def test_split_equals_monolithic_forward(tiny_policy):
    req = random_request(3, 2, 1024, seed=4)
    with torch.no_grad():
        joint = tiny_policy.forward_joint(req["images"], req["tokens"], req["state"], req["noise"])
    assert torch.allclose(run(tiny_policy, req), joint, atol=ATOL)
    assert joint.shape == (3, 50, 32) and torch.isfinite(joint).all()


def test_prefix_shapes(tiny_policy):
    req = random_request(2, 2, 1024, seed=5)
    with torch.no_grad():
        prefix_kv, mask = tiny_policy.encode(req["images"], req["tokens"])
    cfg = tiny_policy.cfg
    assert prefix_kv.shape == (2, cfg.prefix.depth, 2, 1, cfg.prefix_len, cfg.prefix.head_dim)
    assert mask.dtype == torch.bool and mask[:, : 2 * cfg.vision.tokens_per_view].all()
    assert torch.equal(mask[:, -48:], req["tokens"] != 0)


def naive_attention(q, k, v, mask):
    """Softmax attention spelt out: heads of k/v repeated per query head, bool mask [B,T,S]."""
    b, t, h, d = q.shape
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    v = v.repeat_interleave(h // v.shape[1], dim=1)
    scores = torch.einsum("bthd,bhsd->bhts", q, k) / d**0.5
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.einsum("bhts,bhsd->bthd", scores.softmax(-1), v).reshape(b, t, h * d)


def test_attention_matches_naive_softmax():
    from vlaserve.model.policy import attention, attention_bias

    gen = torch.Generator().manual_seed(0)
    for kv_heads in (1, 2):
        q = torch.randn(2, 5, 4, 8, generator=gen)
        k, v = torch.randn(2, kv_heads, 7, 8, generator=gen), torch.randn(2, kv_heads, 7, 8, generator=gen)
        mask = torch.rand(2, 5, 7, generator=gen) > 0.4
        mask[:, :, 0] = True  # no empty row
        got = attention(q, k, v, attention_bias(mask, 4 // kv_heads, q.dtype, 7))
        assert torch.allclose(got, naive_attention(q, k, v, mask), atol=1e-5)
        shared = mask[:, :1]  # one mask row for every query
        got = attention(q, k, v, attention_bias(shared, 4 // kv_heads, q.dtype, 7))
        assert torch.allclose(got, naive_attention(q, k, v, shared.expand(-1, 5, -1)), atol=1e-5)


def test_rope_matches_complex_rotation():
    from vlaserve.model.policy import apply_rope, rope_tables

    positions = torch.tensor([[0, 1, 2, 7, 30]])
    x = torch.randn(1, 5, 3, 16, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_tables(positions, 16, torch.float32)
    inv_freq = 10_000.0 ** (-torch.arange(0, 16, 2).float() / 16)
    rot = torch.polar(torch.ones(1, 5, 8), positions[..., None].float() * inv_freq)[:, :, None]
    z = torch.complex(x[..., :8], x[..., 8:]) * rot  # Gemma's half-split pairs (x_i, x_{i+D/2})
    assert torch.allclose(apply_rope(x, cos, sin), torch.cat([z.real, z.imag], -1), atol=1e-5)


def test_patch_embedding_equals_strided_conv(tiny_policy):
    vision = tiny_policy.vision
    frames = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    x = torch.nn.functional.avg_pool2d(frames.permute(0, 3, 1, 2).float() * (2 / 255) - 1, 224 // vision.cfg.image_size)
    conv = vision.patch_embed(x).flatten(2).transpose(1, 2) + vision.pos_embed
    blocks, vision.blocks = vision.blocks, torch.nn.ModuleList()
    norm, vision.norm = vision.norm, torch.nn.Identity()
    try:
        with torch.no_grad():
            assert torch.allclose(vision(frames), conv, atol=1e-5)
    finally:
        vision.blocks, vision.norm = blocks, norm


def test_a_torchscript_artifact_from_a_newer_torch_is_refused_by_name():
    from vlaserve.errors import VlaserveError
    from vlaserve.runner import check_torch_version

    check_torch_version("encoder_0", "2.13.0", "2.13.0+cpu")
    check_torch_version("encoder_0", "2.11.0+cu130", "2.13.0")  # newer here: fine
    check_torch_version("encoder_0", "", "2.5.1")  # an older export without the field: nothing to compare
    with pytest.raises(VlaserveError, match=r"encoder_0: torch: got '2.5.1 here, the artifact was exported with 2.13"):
        check_torch_version("encoder_0", "2.13.0", "2.5.1")
