"""A robot's observation as a policy request, and the policy's actions as the robot's (the gateway's transforms).

:class:`RobotTransform` applies one robot's settings from the spec (``robots:`` in spec.yaml,
:class:`vlaserve.spec.RobotSettings`), in the spirit of openpi's per-robot policy configs:

- camera frames: the named observation entries, uint8, HWC or CHW, any size; resized on the server to the
  model's 224 x 224 keeping the aspect ratio, the rest padded black (as openpi's ``resize_with_pad``);
- state: the named entries concatenated, normalized with the checkpoint's statistics if given, padded
  with zeros to the model's 32;
- prompt: text, tokenized by the checkpoint's SentencePiece model (beginning-of-sequence, the prompt,
  then a newline, padded with 0 to 48 ids), or without one by the project's stand-in word hasher;
- actions: the first ``action_dim`` of the model's 32, unnormalized with the statistics if given.

A bad observation raises :class:`ObservationError`, naming the key and what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlaserve import interface as io
from vlaserve.errors import VlaserveError
from vlaserve.spec import RobotSettings

STD_EPS = 1e-6  # added to every std, as openpi does (a constant dimension has std 0)
MAX_PROMPT_CHARS = 2000  # longer prompts are refused before tokenizing (48 ids keep far less)
NOISE_KEY = "noise"  # a vlaserve extension: the flow's starting noise [50, 32], for reproducible actions


class ObservationError(VlaserveError):
    """An observation the robot's settings cannot turn into a request."""


def lookup(obs: dict, key: str):
    """``obs[key]``, or for "a/b" ``obs["a"]["b"]`` when there is no entry "a/b" itself; None if absent."""
    if key in obs:
        return obs[key]
    value = obs
    for part in key.split("/"):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def resize_with_pad(frame: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, 3] to [size, size, 3]: scaled to fit (bilinear), centred, padded with black."""
    h, w = frame.shape[:2]
    if (h, w) == (size, size):
        return frame
    from PIL import Image

    ratio = max(w / size, h / size)  # openpi's resize_with_pad: sizes truncated, the padding split evenly
    new_h, new_w = max(1, int(h / ratio)), max(1, int(w / ratio))
    resized = np.asarray(Image.fromarray(frame).resize((new_w, new_h), Image.BILINEAR))
    out = np.zeros((size, size, 3), dtype=np.uint8)
    top, left = max(0, int((size - new_h) / 2)), max(0, int((size - new_w) / 2))
    out[top : top + new_h, left : left + new_w] = resized
    return out


class Tokenizer:
    """A checkpoint's SentencePiece model, or (``path`` None) the stand-in word hasher of vlaserve.client. The
    served model checks the ids against its vocabulary (a tokenizer larger than it gets an error per request)."""

    def __init__(self, path: Path | None):
        self.processor = None
        if path is not None:
            if not Path(path).is_file():
                raise VlaserveError("tokenizer", str(path), "a SentencePiece model file")
            import sentencepiece

            self.processor = sentencepiece.SentencePieceProcessor(model_file=str(path))

    def __call__(self, prompt: str) -> np.ndarray:
        if self.processor is None:
            from vlaserve.client import tokenize

            return tokenize(prompt)
        cleaned = prompt.strip().replace("_", " ").replace("\n", " ")  # as openpi's tokenizer cleans it
        ids = self.processor.encode(cleaned, add_bos=True) + self.processor.encode("\n")
        out = np.zeros(io.MAX_TOKENS, dtype=np.int32)
        ids = ids[: io.MAX_TOKENS]
        out[: len(ids)] = ids
        return out


def _stats(path: Path | None, name: str, dims: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean and std of ``name`` ("state" or "actions") from a statistics file, openpi's ``norm_stats.json``
    (``{"norm_stats": {"state": {"mean", "std", ...}, ...}}``) or the same without the wrapper; longer
    vectors (openpi pads them to the model's 32) are cut to the robot's ``dims``."""
    if path is None:
        return None
    try:
        stats = json.loads(Path(path).read_text())
        stats = stats.get("norm_stats", stats)
        mean = np.asarray(stats[name]["mean"], dtype=np.float32)
        std = np.asarray(stats[name]["std"], dtype=np.float32)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise VlaserveError(
            "norm_stats", str(path), f'a JSON file with {{"{name}": {{"mean": [...], "std": [...]}}}} ({exc})'
        ) from None
    if mean.ndim != 1 or std.shape != mean.shape or mean.size < dims:
        raise VlaserveError(f"norm_stats {name}", f"mean {mean.shape}, std {std.shape}", f"at least {dims} values each")
    return mean[:dims], std[:dims] + STD_EPS


class RobotTransform:
    """One robot's observation -> request and actions -> result, for a policy served with ``views`` views."""

    def __init__(self, name: str, settings: RobotSettings, views: int, base: Path = Path(".")):
        if len(settings.images) != views:
            raise VlaserveError(
                f"robots.{name}.images",
                list(settings.images),
                f"{views} camera keys: the served policy takes {views} views",
            )
        self.name, self.settings = name, settings
        where = Path(base)
        self.tokenizer = Tokenizer(where / settings.tokenizer if settings.tokenizer else None)
        stats = where / settings.norm_stats if settings.norm_stats else None
        self.state_stats = _stats(stats, "state", settings.state_dim)
        self.action_stats = _stats(stats, "actions", settings.action_dim)

    def metadata(self) -> dict:
        """What the gateway sends a robot on connect."""
        s = self.settings
        return {"server": "vlaserve", "robot": self.name, "images": list(s.images), "state_dim": s.state_dim,
                "action_dim": s.action_dim, "action_horizon": io.ACTION_HORIZON}  # fmt: skip

    def _frame(self, obs: dict, key: str) -> np.ndarray:
        frame = lookup(obs, key)
        if frame is None:
            raise ObservationError(key, "missing", f"a uint8 camera frame ({self.settings.image_layout.upper()})")
        frame = np.asarray(frame)
        if frame.dtype != np.uint8:
            raise ObservationError(key, f"dtype {frame.dtype}", "uint8")
        channels = 0 if self.settings.image_layout == "chw" else -1
        if frame.ndim != 3 or frame.shape[channels] != 3 or min(frame.shape) == 0:
            layout = "[3, H, W]" if channels == 0 else "[H, W, 3]"
            raise ObservationError(key, f"shape {list(frame.shape)}", f"{layout} ({self.settings.image_layout})")
        if channels == 0:
            frame = frame.transpose(1, 2, 0)
        return resize_with_pad(np.ascontiguousarray(frame), io.IMAGE_SIZE)

    def _state(self, obs: dict) -> np.ndarray:
        parts = []
        for key in self.settings.state:
            value = lookup(obs, key)
            if value is None:
                raise ObservationError(key, "missing", "a number or a 1-d array of the robot's state")
            value = np.asarray(value)
            if value.dtype.kind not in "fiub" or value.ndim > 1:
                raise ObservationError(key, f"{value.dtype} {list(value.shape)}", "a number or a 1-d numeric array")
            value = value.astype(np.float32).reshape(-1)
            if not np.isfinite(value).all():
                raise ObservationError(key, "a non-finite value", "finite numbers")
            parts.append(value)
        state = np.concatenate(parts)
        if state.shape != (self.settings.state_dim,):
            raise ObservationError(
                "+".join(self.settings.state), f"{state.size} values", f"{self.settings.state_dim} (state_dim)"
            )
        if self.state_stats is not None:
            mean, std = self.state_stats
            state = (state - mean) / std
        return np.pad(state, (0, io.STATE_DIM - state.size)).astype(np.float32)

    def request(self, obs) -> dict[str, np.ndarray]:
        """The policy request (batch of one) for one observation."""
        if not isinstance(obs, dict):
            raise ObservationError("observation", type(obs).__name__, "a dict (msgpack map)")
        s = self.settings
        prompt = lookup(obs, s.prompt_key)
        prompt = s.default_prompt if prompt is None else prompt
        if isinstance(prompt, np.ndarray) and prompt.ndim == 0:  # openpi's clients may send a 0-d string array
            prompt = prompt.item()
        if isinstance(prompt, bytes):
            prompt = prompt.decode("utf-8", errors="replace")
        if not isinstance(prompt, str):
            raise ObservationError(s.prompt_key, type(prompt).__name__, "a string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ObservationError(s.prompt_key, f"{len(prompt)} characters", f"at most {MAX_PROMPT_CHARS}")
        request = {
            io.IMAGES: np.stack([self._frame(obs, key) for key in s.images])[None],
            io.TOKENS: self.tokenizer(prompt)[None],
            io.STATE: self._state(obs)[None],
        }
        noise = obs.get(NOISE_KEY)
        if noise is not None:
            noise = np.asarray(noise)
            shape = (io.ACTION_HORIZON, io.ACTION_DIM)
            if noise.dtype != np.float32 or noise.shape != shape or not np.isfinite(noise).all():
                raise ObservationError(NOISE_KEY, f"{noise.dtype} {list(noise.shape)}", f"finite float32 {list(shape)}")
            request[io.NOISE] = noise[None]
        return request

    def result(self, actions: np.ndarray) -> dict:
        """The robot's actions [50, action_dim] from the policy's [50, 32] (one item)."""
        out = np.asarray(actions, dtype=np.float32)[:, : self.settings.action_dim]
        if self.action_stats is not None:
            mean, std = self.action_stats
            out = out * std + mean
        return {"actions": np.ascontiguousarray(out)}


def example_observation(settings: RobotSettings, seed: int = 0, prompt: str = "pick up the cup") -> dict:
    """An observation such a robot sends (camera-like 224 x 224 frames in its layout, a random state split
    over its keys), for load tests and examples. Keys are written flat ("images/cam_high"), which
    :func:`lookup` finds as they are."""
    from vlaserve.client import camera_frames

    rng = np.random.default_rng(seed)
    obs: dict = {settings.prompt_key: prompt}
    for key, frame in zip(settings.images, camera_frames(len(settings.images), rng)):
        obs[key] = np.ascontiguousarray(frame.transpose(2, 0, 1)) if settings.image_layout == "chw" else frame
    sizes = [settings.state_dim - len(settings.state) + 1] + [1] * (len(settings.state) - 1)
    for key, size in zip(settings.state, sizes):
        obs[key] = rng.normal(size=size).astype(np.float32)
    return obs
