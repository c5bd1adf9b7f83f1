"""Load a ``.safetensors`` state dict in the project's own layout, reporting mismatches by name."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from vlaserve.errors import VlaserveError


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Copy the tensors of ``path`` into ``model``; every missing, unexpected or mis-shaped key is an error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise VlaserveError("--checkpoint", str(path), "an existing .safetensors file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise VlaserveError("--checkpoint", str(path), f"a readable .safetensors file ({exc})") from None
    own = model.state_dict()
    problems = [f"missing {k}" for k in sorted(own.keys() - tensors.keys())]
    problems += [f"unexpected {k}" for k in sorted(tensors.keys() - own.keys())]
    problems += [
        f"{k} has shape {list(tensors[k].shape)}, expected {list(own[k].shape)}"
        for k in sorted(own.keys() & tensors.keys())
        if tensors[k].shape != own[k].shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise VlaserveError("--checkpoint", str(path), f"the layout of this preset ({shown})")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
