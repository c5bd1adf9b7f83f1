"""Load pi0 weights into the policy: the project's own layout, or a LeRobot / openpi PyTorch checkpoint.

A checkpoint is a ``.safetensors`` file or a folder holding ``model.safetensors`` (what LeRobot's
``PI0Policy.save_pretrained`` writes, and what openpi's JAX-to-PyTorch conversion writes). Its layout is
recognised by its names:

- **the project's own** (``prefix_layers.0.qkv_proj.weight``, ...): copied as it is;
- **LeRobot's PI0Policy or openpi's PI0Pytorch** (``[model.]paligemma_with_expert.paligemma...``,
  ``...gemma_expert...``, ``state_proj``, ``action_in_proj`` / ``action_out_proj``,
  ``action_time_mlp_in`` / ``_out``): renamed, with q/k/v and gate/up joined into the project's fused
  products. The older transformers layout (``paligemma.language_model.model.layers``) is read too.

The layers pi0 never runs at inference are dropped: the language model's final norm, its ``lm_head``
(the token embedding under another name, and read as that where the embedding itself was not saved),
and the expert's ``lm_head``. Every other name must be used, every used name present, and every shape
right; otherwise the error lists the names and shapes. A pi0.5 checkpoint (no state projection, a time
MLP of its own, adaptive norms in the expert) is a different model and is refused by name.

A folder's ``config.json`` (LeRobot's or openpi's) is read for the numbers the served interface fixes
(action chunk, state and action widths, flow steps, prompt length); one that differs is an error, not
a silent change.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from vlaserve.errors import VlaserveError
from vlaserve.interface import ACTION_DIM, ACTION_HORIZON, MAX_TOKENS, NUM_FLOW_STEPS, STATE_DIM

WEIGHTS_FILE = "model.safetensors"
OPENPI_ROOT = "paligemma_with_expert."
PALIGEMMA = "paligemma_with_expert.paligemma."
VISION = PALIGEMMA + "model.vision_tower.vision_model."
LANGUAGE = PALIGEMMA + "model.language_model."
EXPERT = "paligemma_with_expert.gemma_expert."
# the older transformers layout of PaliGemma (before 4.52), renamed to the newer one first
OLDER_LAYOUT = {
    PALIGEMMA + "language_model.model.": LANGUAGE,
    PALIGEMMA + "language_model.lm_head.": PALIGEMMA + "lm_head.",
    PALIGEMMA + "vision_tower.": PALIGEMMA + "model.vision_tower.",
    PALIGEMMA + "multi_modal_projector.": PALIGEMMA + "model.multi_modal_projector.",
}
# Never run at inference: the prefix model's last norm (only its keys/values are read) and the two heads.
UNUSED = (LANGUAGE + "norm.weight", PALIGEMMA + "lm_head.weight", EXPERT + "lm_head.weight")
# Older LeRobot files also hold their normalization statistics as buffers: not weights of the model (the
# gateway's robots take statistics from a norm_stats.json file), so they are left out, not imported.
STATISTICS = ("normalize_inputs.", "normalize_targets.", "unnormalize_outputs.")
# config.json fields (LeRobot's names, then openpi's) that the served interface fixes
FIXED_NUMBERS = {
    "chunk_size": ACTION_HORIZON,
    "action_horizon": ACTION_HORIZON,
    "max_state_dim": STATE_DIM,
    "max_action_dim": ACTION_DIM,
    "action_dim": ACTION_DIM,
    "num_inference_steps": NUM_FLOW_STEPS,
    "num_steps": NUM_FLOW_STEPS,  # older LeRobot
    "tokenizer_max_length": MAX_TOKENS,
}


def _fail(path: Path, what: str, problems: list[str]) -> None:
    shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
    raise VlaserveError("--checkpoint", str(path), f"{what} ({shown})")


def weights_file(path: Path) -> Path:
    """The ``.safetensors`` file of a checkpoint given as a file or as a folder holding ``model.safetensors``."""
    if path.is_dir():
        if not (path / WEIGHTS_FILE).is_file():
            raise VlaserveError("--checkpoint", str(path), f"a .safetensors file, or a folder holding {WEIGHTS_FILE}")
        return path / WEIGHTS_FILE
    if not path.is_file():
        raise VlaserveError(
            "--checkpoint", str(path), f"an existing .safetensors file, or a folder holding {WEIGHTS_FILE}"
        )
    return path


def check_config(path: Path, views: int | None = None) -> None:
    """The ``config.json`` beside the weights (a folder's, or that of a ``model.safetensors`` given as a file): a
    pi0 whose fixed numbers are the served interface's, with ``views`` cameras where it lists them."""
    folder = path if path.is_dir() else path.parent if path.name == WEIGHTS_FILE else None
    config_file = folder / "config.json" if folder else None
    if config_file is None or not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise VlaserveError("--checkpoint", str(config_file), f"readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise VlaserveError("--checkpoint", str(config_file), "a JSON object")
    kind = config.get("type")
    if kind is not None and kind != "pi0":
        raise VlaserveError("--checkpoint", str(config_file), f"a pi0 policy (its type is {kind!r})")
    wrong = [f"{k} is {config[k]!r}, the served interface has {v}" for k, v in FIXED_NUMBERS.items()
             if k in config and config[k] != v]  # fmt: skip
    features = config.get("input_features")
    if views is not None and isinstance(features, dict):
        cameras = [k for k, f in features.items() if isinstance(f, dict) and f.get("type") == "VISUAL"]
        if cameras and len(cameras) != views:
            wrong.append(f"{len(cameras)} cameras ({', '.join(cameras)}), the export has --views {views}")
    if wrong:
        _fail(config_file, "a pi0 with the served interface's numbers", wrong)


def _split_heads(tensors: dict[str, torch.Tensor], prefix: str, parts: tuple[str, ...]) -> torch.Tensor | None:
    """The tensors ``prefix + part`` joined along the output rows, or None if any is absent."""
    chosen = [tensors.get(prefix + part) for part in parts]
    if any(t is None for t in chosen):
        return None
    return torch.cat(chosen, dim=0)


def _depth(tensors: dict, prefix: str) -> int:
    """Layers under ``prefix`` (``...layers.<i>.``): the highest index plus one."""
    found = [int(k[len(prefix) :].split(".", 1)[0]) for k in tensors if k.startswith(prefix)]
    return max(found) + 1 if found else 0


def _check_depths(tensors: dict, model: nn.Module, path: Path) -> None:
    """A checkpoint of another size is named as such, with the preset it would need."""
    found = {"vision": _depth(tensors, VISION + "encoder.layers."), "prefix": _depth(tensors, LANGUAGE + "layers."),
             "expert": _depth(tensors, EXPERT + "model.layers.")}  # fmt: skip
    cfg = model.cfg
    wanted = {"vision": cfg.vision.depth, "prefix": cfg.prefix.depth, "expert": cfg.expert.depth}
    if all(found.values()) and found != wanted:
        from vlaserve.model.presets import PRESETS

        fits = [p.name for p in PRESETS.values()
                if (p.vision.depth, p.prefix.depth, p.expert.depth) == tuple(found.values())]  # fmt: skip
        hint = f": export with --preset {fits[0]} (PRESET={fits[0]})" if fits else ""
        _fail(path, f"a checkpoint of the {cfg.name} preset's depths {wanted}", [f"its depths are {found}{hint}"])


def from_openpi(tensors: dict[str, torch.Tensor], model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """LeRobot's / openpi's pi0 names and tensors -> the project's (``model`` gives the depths)."""

    def renamed(rename) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in tensors.items():
            name = rename(key)
            if name in out:  # two names for one tensor: which one is meant cannot be told
                _fail(path, "one tensor per name", [f"{key} and another name both read as {name}"])
            out[name] = value
        return out

    tensors = {k: v for k, v in tensors.items() if not k.removeprefix("model.").startswith(STATISTICS)}
    tensors = renamed(lambda k: k.removeprefix("model."))  # LeRobot wraps openpi's module
    for old, new in OLDER_LAYOUT.items():
        tensors = renamed(lambda k, old=old, new=new: new + k[len(old) :] if k.startswith(old) else k)
    pi05 = sorted(k for k in tensors if k.startswith("time_mlp_") or ".dense." in k)
    if pi05 and "state_proj.weight" not in tensors:
        _fail(path, "a pi0 checkpoint, not pi0.5 (adaptive norms in the expert, no state token)", pi05)
    # some pi0 checkpoints name the action-time MLP as pi0.5 names its time MLP; LeRobot reads them as pi0's
    tensors = renamed(lambda k: "action_" + k if k.startswith("time_mlp_") else k)
    _check_depths(tensors, model, path)

    sources: dict[str, tuple[str, ...]] = {}  # own name -> checkpoint names (several: joined row-wise)

    def linear(own: str, theirs: str, bias: bool = True, parts: tuple[str, ...] = ("",)) -> None:
        sources[own + ".weight"] = tuple(theirs + p + ".weight" for p in parts)
        if bias:
            sources[own + ".bias"] = tuple(theirs + p + ".bias" for p in parts)

    sources["vision.pos_embed"] = (VISION + "embeddings.position_embedding.weight",)
    linear("vision.patch_embed", VISION + "embeddings.patch_embedding")
    for i in range(len(model.vision.blocks)):
        own, theirs = f"vision.blocks.{i}.", f"{VISION}encoder.layers.{i}."
        linear(own + "norm1", theirs + "layer_norm1")
        linear(own + "qkv", theirs + "self_attn.", parts=("q_proj", "k_proj", "v_proj"))
        linear(own + "out", theirs + "self_attn.out_proj")
        linear(own + "norm2", theirs + "layer_norm2")
        linear(own + "fc1", theirs + "mlp.fc1")
        linear(own + "fc2", theirs + "mlp.fc2")
    linear("vision.norm", VISION + "post_layernorm")
    linear("image_proj", PALIGEMMA + "model.multi_modal_projector.linear")
    # PaliGemma ties its head to the token embedding; a file saved with shared tensors dropped keeps one name
    embedding, head = LANGUAGE + "embed_tokens.weight", PALIGEMMA + "lm_head.weight"
    sources["embed_tokens.weight"] = (embedding if embedding in tensors or head not in tensors else head,)
    for layers, theirs in (("prefix_layers", LANGUAGE), ("expert_layers", EXPERT + "model.")):
        for i in range(len(getattr(model, layers))):
            own, src = f"{layers}.{i}.", f"{theirs}layers.{i}."
            linear(own + "input_norm", src + "input_layernorm", bias=False)
            linear(own + "qkv_proj", src + "self_attn.", bias=False, parts=("q_proj", "k_proj", "v_proj"))
            linear(own + "o_proj", src + "self_attn.o_proj", bias=False)
            linear(own + "mlp_norm", src + "post_attention_layernorm", bias=False)
            linear(own + "gate_up_proj", src + "mlp.", bias=False, parts=("gate_proj", "up_proj"))
            linear(own + "down_proj", src + "mlp.down_proj", bias=False)
    linear("expert_norm", EXPERT + "model.norm", bias=False)
    for name in ("state_proj", "action_in_proj", "action_out_proj", "action_time_mlp_in", "action_time_mlp_out"):
        linear(name, name)

    missing = sorted({name for names in sources.values() for name in names if name not in tensors})
    missing = [f"{m} (or {head})" if m == embedding else m for m in missing]
    used = {name for names in sources.values() for name in names} | set(UNUSED)
    unexpected = sorted(tensors.keys() - used)
    if missing or unexpected:
        problems = [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
        _fail(path, "a pi0 checkpoint with this preset's layers", problems)
    own = model.state_dict()
    converted, wrong = {}, []
    for name, names in sources.items():
        parts = [tensors[n] for n in names]
        joinable = len({p.shape[1:] for p in parts}) == 1  # q/k/v or gate/up: rows of one product
        joined = torch.cat(parts, dim=0) if joinable and len(parts) > 1 else parts[0] if joinable else None
        if joined is None or joined.shape != own[name].shape:
            shapes = ", ".join(f"{n} {list(t.shape)}" for n, t in zip(names, parts))
            wrong.append(f"{shapes} for {name} {list(own[name].shape)}")
        else:
            converted[name] = joined
    if wrong:
        _fail(path, "the shapes of this preset", wrong)
    return converted


def load_checkpoint(model: nn.Module, path: str | Path, views: int | None = None) -> str:
    """Copy the checkpoint at ``path`` into ``model``; returns the layout it was in ("vlaserve" or "openpi").

    Every missing, unexpected or mis-shaped name is an error that lists them."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    file = weights_file(path)
    check_config(path, views if views is not None else getattr(getattr(model, "cfg", None), "views", None))
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise VlaserveError("--checkpoint", str(file), f"a readable .safetensors file ({exc})") from None
    layout = "openpi" if any(OPENPI_ROOT in k for k in tensors) else "vlaserve"
    if layout == "openpi":
        tensors = from_openpi(tensors, model, file)
    own = model.state_dict()
    problems = [f"missing {k}" for k in sorted(own.keys() - tensors.keys())]
    problems += [f"unexpected {k}" for k in sorted(tensors.keys() - own.keys())]
    problems += [
        f"{k} has shape {list(tensors[k].shape)}, expected {list(own[k].shape)}"
        for k in sorted(own.keys() & tensors.keys())
        if tensors[k].shape != own[k].shape
    ]
    if problems:
        _fail(file, "the layout of this preset", problems)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
    return layout
