"""Semantics of the PyTorch policy (tiny preset): masking, batch independence, noise, split == monolithic."""

import torch

from export.parity import random_request

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
