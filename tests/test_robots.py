"""A robot's observation as a policy request and the actions back (vlaserve.robots), without a server."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import SPEC
from vlaserve import interface as io
from vlaserve.errors import VlaserveError
from vlaserve.robots import ObservationError, RobotTransform, Tokenizer, resize_with_pad
from vlaserve.spec import load_spec


def droid_obs(rng, prompt="pick up the cup"):
    return {
        "observation/exterior_image_1_left": rng.integers(0, 255, (180, 320, 3), dtype=np.uint8),
        "observation/wrist_image_left": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
        "observation/joint_position": rng.normal(size=7),
        "observation/gripper_position": np.array([0.5]),
        "prompt": prompt,
    }


def test_frames_are_resized_keeping_their_aspect_and_padded_black():
    frame = np.full((100, 200, 3), 200, dtype=np.uint8)
    out = resize_with_pad(frame, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert (out[:50] == 0).all() and (out[-50:] == 0).all() and (out[60:160] == 200).all()  # 112 rows of image


def test_a_droid_observation_becomes_a_request_and_the_actions_come_back_sliced():
    spec = load_spec(SPEC)
    robot = RobotTransform("droid", spec.robots["droid"], views=2)
    obs = droid_obs(np.random.default_rng(0))
    request = robot.request(obs)
    assert request[io.IMAGES].shape == (1, 2, 224, 224, 3) and request[io.IMAGES].dtype == np.uint8
    assert np.array_equal(request[io.IMAGES][0, 1], obs["observation/wrist_image_left"])  # already 224: as it is
    state = request[io.STATE][0]
    assert state.shape == (32,) and np.allclose(state[:7], obs["observation/joint_position"]) and state[7] == 0.5
    assert not state[8:].any() and request[io.TOKENS].shape == (1, 48) and request[io.TOKENS][0, 0] > 0
    actions = np.arange(50 * 32, dtype=np.float32).reshape(50, 32)
    assert robot.result(actions)["actions"].shape == (50, 8)
    assert robot.metadata()["action_dim"] == 8


def test_chw_frames_normalization_and_nested_keys(tmp_path):
    spec = load_spec(SPEC)
    # as openpi writes them: wrapped, padded to 32, a constant dimension's std 0
    state = {"mean": [1.0] * 32, "std": [2.0] * 13 + [0.0] + [2.0] * 18}
    stats = {"norm_stats": {"state": state, "actions": {"mean": [10.0] * 32, "std": [3.0] * 32}}}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    settings = spec.robots["aloha"].__class__(**{**spec.robots["aloha"].__dict__, "norm_stats": "stats.json"})
    robot = RobotTransform("aloha", settings, views=3, base=tmp_path)
    rng = np.random.default_rng(1)
    images = {
        k: rng.integers(0, 255, (3, 224, 224), dtype=np.uint8)
        for k in ("cam_high", "cam_left_wrist", "cam_right_wrist")
    }
    request = robot.request({"images": images, "state": np.full(14, 5.0, dtype=np.float32), "prompt": "fold"})
    assert np.array_equal(request[io.IMAGES][0, 0], images["cam_high"].transpose(1, 2, 0))
    assert np.allclose(request[io.STATE][0, :13], 2.0) and request[io.STATE][0, 13] > 1e5  # (5 - 1) / (std + 1e-6)
    assert np.allclose(robot.result(np.ones((50, 32), np.float32))["actions"], 13.0)  # 1 * 3 + 10
    with pytest.raises(
        VlaserveError, match=r"robots.aloha.images: .* expected 2 camera keys: the served policy takes 2"
    ):
        RobotTransform("aloha", spec.robots["aloha"], views=2)


@pytest.mark.parametrize(
    "edit, field, expected",
    [
        (lambda o: o.pop("observation/wrist_image_left"), "observation/wrist_image_left", "uint8 camera frame"),
        (lambda o: o.update({"observation/wrist_image_left": np.zeros((224, 224, 3), np.float32)}), "observation/wrist_image_left", "uint8"),
        (lambda o: o.update({"observation/wrist_image_left": np.zeros((224, 224), np.uint8)}), "observation/wrist_image_left", "[H, W, 3]"),
        (lambda o: o["observation/joint_position"].__setitem__(2, np.nan), "observation/joint_position", "finite"),
        (lambda o: o.update({"observation/joint_position": np.zeros(6)}), "observation/joint_position+observation/gripper_position", "8 (state_dim)"),
        (lambda o: o.update({"prompt": 7}), "prompt", "a string"),
        (lambda o: o.update({"noise": np.zeros((50, 31), np.float32)}), "noise", "float32 [50, 32]"),
    ],
)  # fmt: skip
def test_a_bad_observation_names_its_key(edit, field, expected):
    robot = RobotTransform("droid", load_spec(SPEC).robots["droid"], views=2)
    obs = droid_obs(np.random.default_rng(2))
    edit(obs)
    with pytest.raises(ObservationError) as caught:
        robot.request(obs)
    assert caught.value.field == field and expected in caught.value.expected, caught.value


def test_a_sentencepiece_tokenizer_from_a_file(tmp_path):
    """Trained here on the fly (nothing can be downloaded): BOS, the prompt's pieces, a newline, padding."""
    import sentencepiece

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["pick up the red block", "fold the towel", "put the cup in the sink"] * 50))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40, model_type="bpe",
        user_defined_symbols=["\n"], bos_id=2, eos_id=1, unk_id=3, pad_id=0, minloglevel=2,
    )  # fmt: skip
    tokenizer = Tokenizer(tmp_path / "sp.model")
    ids = tokenizer("fold the towel")
    assert ids.dtype == np.int32 and ids.shape == (48,) and ids[0] == 2
    length = int((ids != 0).sum())
    assert 3 < length < 20 and not ids[length:].any()
    assert not np.array_equal(ids, tokenizer("pick up the red block"))
    with pytest.raises(VlaserveError, match="tokenizer"):
        Tokenizer(tmp_path / "missing.model")


def test_statistics_that_cannot_be_read_are_named(tmp_path):
    spec = load_spec(SPEC)
    settings = spec.robots["droid"].__class__(**{**spec.robots["droid"].__dict__, "norm_stats": "stats.json"})
    with pytest.raises(VlaserveError, match="norm_stats"):
        RobotTransform("droid", settings, views=2, base=tmp_path)  # no such file
    (tmp_path / "stats.json").write_text('{"state": {"mean": [0, 0], "std": [1, 1]}}')
    with pytest.raises(VlaserveError, match="at least 8 values each"):
        RobotTransform("droid", settings, views=2, base=tmp_path)
