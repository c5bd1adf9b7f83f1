"""Parity of exported artifacts against the PyTorch model: fresh random inputs, error figures, thresholds."""

from __future__ import annotations

import torch

from vlaserve.interface import ACTION_DIM, ACTION_HORIZON, IMAGE_CHANNELS, IMAGE_SIZE, MAX_TOKENS, STATE_DIM

# Largest allowed relative error ||artifact - torch|| / ||torch|| per dtype.
REL_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 5e-2}
# A step whose products run in float8 (spec precision: fp8), against its own artifact: e4m3 keeps 3 mantissa
# bits. Its outputs (pi0's prefix keys/values) were 0.044 from bf16 with random weights on the H200, the
# actions the decoder made from them 0.026 (docs/BENCHMARKS.md); a broken product is far beyond either.
REL_TOLERANCE["fp8"] = 1e-1


def judged_as(dtype: str, precision: str | None) -> str:
    """The REL_TOLERANCE key a step's answers are judged at: "fp8" where its products run in float8 (its
    runtime's ``precision``), otherwise its artifact's dtype."""
    return "fp8" if precision == "fp8" else dtype


def random_request(
    batch: int, views: int, vocab_size: int, seed: int, prompt_tokens: int = MAX_TOKENS
) -> dict[str, torch.Tensor]:
    """Camera-like frames, a prompt of random length up to ``prompt_tokens`` ids (the rest of the
    MAX_TOKENS padding), a state and noise."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab_size, (batch, MAX_TOKENS), generator=gen, dtype=torch.int32)
    lengths = torch.randint(1, prompt_tokens + 1, (batch, 1), generator=gen)
    tokens[torch.arange(MAX_TOKENS)[None] >= lengths] = 0
    return {
        "images": torch.randint(
            0, 256, (batch, views, IMAGE_SIZE, IMAGE_SIZE, IMAGE_CHANNELS), generator=gen, dtype=torch.uint8
        ),
        "tokens": tokens,
        "state": torch.randn(batch, STATE_DIM, generator=gen),
        "noise": torch.randn(batch, ACTION_HORIZON, ACTION_DIM, generator=gen),
    }


def compare(actual, expected: torch.Tensor) -> dict[str, float]:
    """max-abs and relative (L2) error of ``actual`` (array or tensor) against ``expected``, in float64."""
    a = torch.as_tensor(actual).detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.shape != e.shape or not torch.isfinite(a).all():
        return {"max_abs": float("inf"), "rel": float("inf")}
    diff = a - e
    return {"max_abs": float(diff.abs().max()), "rel": float(diff.norm() / e.norm().clamp_min(1e-12))}


def randomize_biases_and_norms(policy: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Add normal noise of ``scale`` to every bias and every norm weight of ``policy``, in place.
    ``build_policy``'s seeded weights leave biases at zero and norms at identity, so a check of a kernel that
    adds a bias or multiplies a norm's scale in would pass even where it drops them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in policy.named_parameters():
            if name.endswith("bias") or "norm" in name:
                value.add_((torch.randn(value.shape, generator=gen) * scale).to(value.device, value.dtype))
