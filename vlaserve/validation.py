"""Checks on request tensors that Triton's own shape and dtype checks do not cover.

Each check raises :class:`~vlaserve.errors.VlaserveError` naming the tensor, what was wrong and what is
accepted; the runner turns it into an error response for that request alone.
"""

from __future__ import annotations

import numpy as np

from vlaserve import interface as io
from vlaserve.errors import VlaserveError


def check_batch(name: str, array, item_shape) -> None:
    """A non-empty batch whose per-item shape is the one the model was exported for."""
    shape = tuple(array.shape)
    if len(shape) == 0 or shape[0] == 0:
        raise VlaserveError(name, f"shape {list(shape)}", "a batch of at least one item")
    if shape[1:] != tuple(item_shape):
        if name == io.IMAGES and len(shape) == 5 and shape[2:] == tuple(item_shape[1:]):
            raise VlaserveError(name, f"{shape[1]} views", f"{item_shape[0]} views, as this model was exported for")
        raise VlaserveError(name, f"shape {list(shape)}", f"[batch, {', '.join(map(str, item_shape))}]")


def check_tokens(tokens: np.ndarray, vocab_size: int, prompt_tokens: int = io.MAX_TOKENS) -> None:
    """Token ids in [0, vocab_size); 0 is padding, and past the model's ``prompt_tokens`` positions (what it
    was exported to compute on) there is nothing else: a longer prompt is refused, never cut short."""
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise VlaserveError(io.TOKENS, f"id {int(tokens[where])} at {list(where)}", f"ids in [0, {vocab_size})")
    beyond = tokens[:, prompt_tokens:] != 0
    if beyond.any():
        row = int(np.argwhere(beyond)[0][0])
        length = int(np.flatnonzero(tokens[row])[-1]) + 1
        raise VlaserveError(
            io.TOKENS,
            f"a prompt reaching position {length} (item {row})",
            f"at most {prompt_tokens} token positions, the rest 0: this model was exported with --prompt-tokens "
            f"{prompt_tokens}",
        )


def check_finite(name: str, array: np.ndarray) -> None:
    """No NaN or infinity."""
    finite = np.isfinite(array)
    if not finite.all():
        where = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise VlaserveError(name, f"{array[where]} at {list(where)}", "finite values (no NaN or Inf)")
