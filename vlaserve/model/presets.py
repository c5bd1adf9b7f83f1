"""Model presets: the one place where model sizes live.

``tiny`` has the pi0 structure with small widths and a 32-pixel internal image size, so it builds,
exports and runs in seconds on a CPU; ``pi0`` has the full dimensions (about 3.3 B parameters).
"""

from __future__ import annotations

import dataclasses

from vlaserve.errors import VlaserveError
from vlaserve.interface import IMAGE_SIZE, MAX_TOKENS, MAX_VIEWS


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """A SigLIP-style vision tower."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    image_size: int  # internal resolution; camera frames (224) are area-downsampled to it

    @property
    def tokens_per_view(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """A Gemma-style transformer (the prefix model or the action expert)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """The whole policy: vision tower, prefix transformer, action expert, the view count, and how many of the
    request's prompt token ids the encoder computes on (the rest of the wire's MAX_TOKENS must be padding)."""

    name: str
    vision: VisionConfig
    prefix: GemmaConfig
    expert: GemmaConfig
    vocab_size: int
    views: int = 2
    prompt_tokens: int = MAX_TOKENS

    def __post_init__(self):
        if not 1 <= self.views <= MAX_VIEWS:
            raise VlaserveError("views", self.views, f"an integer in 1..{MAX_VIEWS}")
        if not isinstance(self.prompt_tokens, int) or not 1 <= self.prompt_tokens <= MAX_TOKENS:
            raise VlaserveError("prompt_tokens", self.prompt_tokens, f"an integer in 1..{MAX_TOKENS}")
        if IMAGE_SIZE % self.vision.image_size:
            raise VlaserveError("vision.image_size", self.vision.image_size, f"a divisor of {IMAGE_SIZE}")
        if self.vision.image_size % self.vision.patch_size:
            raise VlaserveError("vision.patch_size", self.vision.patch_size, "a divisor of vision.image_size")
        if self.prefix.depth != self.expert.depth:
            raise VlaserveError("expert.depth", self.expert.depth, f"the prefix depth {self.prefix.depth}")
        for field in ("num_heads", "num_kv_heads", "head_dim"):
            if getattr(self.prefix, field) != getattr(self.expert, field):
                raise VlaserveError(f"expert.{field}", getattr(self.expert, field), "the prefix model's value")

    @property
    def prefix_len(self) -> int:
        return self.views * self.vision.tokens_per_view + self.prompt_tokens


PRESETS: dict[str, PolicyConfig] = {
    "tiny": PolicyConfig(
        name="tiny",
        vision=VisionConfig(width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=8, image_size=32),
        prefix=GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16),
        expert=GemmaConfig(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16),
        vocab_size=1024,
    ),
    "pi0": PolicyConfig(
        name="pi0",
        vision=VisionConfig(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14, image_size=224),
        prefix=GemmaConfig(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256),
        expert=GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
        vocab_size=257152,
    ),
}


def get_preset(name: str, views: int = 2, prompt_tokens: int = MAX_TOKENS) -> PolicyConfig:
    """The named preset with the given number of camera views and prompt positions; a clear error for
    anything else."""
    if name not in PRESETS:
        raise VlaserveError("preset", name, f"one of {sorted(PRESETS)}")
    if not isinstance(views, int) or not 1 <= views <= MAX_VIEWS:
        raise VlaserveError("views", views, f"an integer in 1..{MAX_VIEWS}")
    return dataclasses.replace(PRESETS[name], views=views, prompt_tokens=prompt_tokens)
