"""LeRobot's own pi0, as the reference that vlaserve's checkpoint import is checked against.

Runs in the separate virtualenv ``make lerobot-venv`` makes (``.venv-lerobot``: LeRobot 0.4.4 and the
transformers 4.53.2 that openpi's pi0 patches), never in the project's own. It:

1. builds LeRobot's ``PI0Policy`` at the sizes of a vlaserve ``PolicyConfig`` (given as JSON), with
   seeded random weights at a scale that keeps activations of order one (LeRobot's own initialisation
   is a 0.02 normal, under which every action is close to noise);
2. saves it the way LeRobot saves a trained policy (``save_pretrained``: ``config.json`` and
   ``model.safetensors``);
3. runs ``predict_action_chunk`` on the observation in ``--request`` (an ``.npz`` of vlaserve's request
   tensors: uint8 NHWC frames, prompt token ids with 0 as padding, state and noise) and writes the actions.

LeRobot hard-codes the sizes of pi0: SigLIP so400m, the 257,152-word vocabulary and Gemma 2B / 300M.
To check the import on a CPU in seconds, the sizes are replaced at two points, before the model is
built: ``get_gemma_config`` (the two Gemma sizes) and the PaliGemma constructor (the vision tower's
sizes, the projector's output width and the vocabulary are set on the config LeRobot made). Everything
that computes runs unchanged: LeRobot's pi0 code and the patched transformers models.

LeRobot's package imports its dataset, robot and video tooling at import time. Two of those are replaced by
stand-ins whose every call raises, since pi0 never calls them: ``torchvision``, which cannot be installed
here (PyPI's wheels are built for CUDA torch, the project's torch is the CPU build), and ``av`` (video
decoding), whose current wheels need Python 3.11 where the project runs on 3.10 too.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import math
import sys
import types
from pathlib import Path


class _Absent:
    """A name from a package that is not installed here: any attribute is another stand-in, a call raises."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Absent(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} was called, but it is not installed for this check")

    def __or__(self, other):  # type annotations such as `transforms.Compose | None`
        return self

    __ror__ = __or__

    def __getitem__(self, item):
        return self

    def __mro_entries__(self, bases):  # classes that derive from one
        return (object,)


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: tuple[str, ...]):
        self.roots = roots

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda attr: _Absent(f"{spec.name}.{attr}")
        return module

    def exec_module(self, module):
        pass


def import_lerobot_pi0():
    """LeRobot's pi0 modules, without running ``lerobot.policies``' ``__init__`` (it imports every policy)."""
    import importlib.util

    # transformers first, so that its own checks of what is installed see the real world
    from transformers.models.siglip import check

    if not check.check_whether_transformers_replace_is_installed_correctly():
        raise SystemExit("transformers is not the version openpi's pi0 patch is for: run `make lerobot-venv` again")
    import transformers.models.gemma.modeling_gemma  # noqa: F401
    import transformers.models.paligemma.modeling_paligemma  # noqa: F401

    sys.meta_path.insert(0, _StandIns(("torchvision", "av")))
    policies = Path(importlib.util.find_spec("lerobot").submodule_search_locations[0]) / "policies"
    package = types.ModuleType("lerobot.policies")
    package.__path__ = [str(policies)]
    sys.modules["lerobot.policies"] = package
    from lerobot.policies.pi0 import configuration_pi0, modeling_pi0

    return configuration_pi0, modeling_pi0


def resize_lerobot(modeling, sizes: dict) -> None:
    """Make LeRobot build pi0 at ``sizes`` (a vlaserve PolicyConfig as a dict) instead of its fixed sizes."""
    gemma = {"gemma_2b": sizes["prefix"], "gemma_300m": sizes["expert"]}
    modeling.get_gemma_config = lambda variant: modeling.GemmaConfig(**gemma[variant])
    build = modeling.PaliGemmaForConditionalGeneration
    vision = sizes["vision"]

    def paligemma(config):
        v = config.vision_config
        v.hidden_size, v.num_hidden_layers = vision["width"], vision["depth"]
        v.intermediate_size, v.num_attention_heads = vision["mlp_dim"], vision["num_heads"]
        v.patch_size, v.image_size = vision["patch_size"], vision["image_size"]
        v.projection_dim = sizes["prefix"]["width"]
        config.text_config.vocab_size = sizes["vocab_size"]
        return build(config=config)

    modeling.PaliGemmaForConditionalGeneration = paligemma


def randomize(model, seed: int) -> None:
    """Seeded weights at a scale that keeps activations of order one, biases and norm scales included."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)

    def normal(shape, scale):
        return torch.randn(shape, generator=gen) * scale

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.copy_(normal(module.weight.shape, 1 / math.sqrt(module.weight[0].numel())))
                if module.bias is not None:
                    module.bias.copy_(normal(module.bias.shape, 0.1))
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(normal(module.weight.shape, 1 / math.sqrt(module.embedding_dim)))
            elif isinstance(module, nn.LayerNorm):
                module.weight.copy_(1 + normal(module.weight.shape, 0.1))
                module.bias.copy_(normal(module.bias.shape, 0.1))
            elif type(module).__name__ == "GemmaRMSNorm":  # scales by (1 + weight)
                module.weight.copy_(normal(module.weight.shape, 0.1))


def make_policy(configuration, modeling, request: dict, side: int, seed: int, **config):
    """LeRobot's PI0Policy for vlaserve's ``request`` (its views, state and action sizes) at frames of ``side``,
    with :func:`randomize`'s weights, on ``config["device"]`` and in eval mode; ``config``: more PI0Config
    fields (device, dtype, compile_model). Returns it and its camera keys."""
    from lerobot.configs.types import FeatureType, PolicyFeature

    cameras = [f"observation.images.camera{i}" for i in range(request["images"].shape[1])]
    pi0_config = configuration.PI0Config(
        image_resolution=(side, side),
        input_features={
            **{key: PolicyFeature(type=FeatureType.VISUAL, shape=(3, side, side)) for key in cameras},
            "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(request["state"].shape[1],)),
        },
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(request["noise"].shape[2],))},
        **config,
    )
    policy = modeling.PI0Policy(pi0_config)
    randomize(policy, seed)
    return policy.to(config.get("device", "cpu")).eval(), cameras


def observation(request: dict, cameras: list[str], side: int) -> dict:
    """LeRobot's observation of vlaserve's request tensors (numpy: uint8 NHWC frames [B, V, H, W, C], prompt
    token ids with 0 as padding, state), on the host: float frames in [0, 1], channels first. vlaserve's
    frames are 224 x 224 and a preset with a smaller internal size averages pixel blocks down to it; LeRobot
    would resize with bilinear filtering instead, so the blocks are averaged here, before LeRobot sees them."""
    import torch
    import torch.nn.functional as F

    frames = torch.from_numpy(request["images"]).float().div(255.0)
    frames = frames.flatten(0, 1).permute(0, 3, 1, 2)
    if frames.shape[-1] != side:
        frames = F.avg_pool2d(frames, frames.shape[-1] // side)
    frames = frames.unflatten(0, request["images"].shape[:2])
    tokens = torch.from_numpy(request["tokens"]).long()
    out = {key: frames[:, i] for i, key in enumerate(cameras)}
    out["observation.state"] = torch.from_numpy(request["state"])
    out["observation.language.tokens"] = tokens
    out["observation.language.attention_mask"] = tokens != 0
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", required=True, help="a vlaserve PolicyConfig as JSON (dataclasses.asdict)")
    parser.add_argument("--request", required=True, type=Path, help=".npz of images, tokens, state, noise")
    parser.add_argument("--checkpoint", required=True, type=Path, help="folder to save LeRobot's policy in")
    parser.add_argument("--actions", required=True, type=Path, help=".npy to write LeRobot's actions to")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    sizes = json.loads(args.sizes)
    configuration, modeling = import_lerobot_pi0()
    resize_lerobot(modeling, sizes)
    request = dict(np.load(args.request))
    side = sizes["vision"]["image_size"]
    policy, cameras = make_policy(configuration, modeling, request, side, args.seed, device="cpu", dtype="float32")
    policy.save_pretrained(args.checkpoint)

    with torch.no_grad():
        actions = policy.predict_action_chunk(
            observation(request, cameras, side), noise=torch.from_numpy(request["noise"])
        )
    np.save(args.actions, actions.numpy())
    params = sum(p.numel() for p in policy.parameters())
    print(f"LeRobot PI0Policy: {params:,} parameters, actions {tuple(actions.shape)} -> {args.actions}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
