"""The simulated-ALOHA example (demo/aloha_sim.py) without its simulator: what it sends fits the gateway's
aloha robot, and bad options are refused. The closed loop itself runs with `make aloha-sim` (docs/BENCHMARKS.md)."""

from __future__ import annotations

import numpy as np
import pytest

from demo.aloha_sim import main, robot_observation
from tests.conftest import SPEC
from vlaserve import interface as io
from vlaserve.robots import RobotTransform
from vlaserve.spec import load_spec


class FakePhysics:
    """Renders the wrist cameras as gym-aloha's physics would: HWC uint8 of the asked size."""

    def __init__(self):
        self.asked = []

    def render(self, height, width, camera_id):
        self.asked.append(camera_id)
        return np.full((height, width, 3), 7, dtype=np.uint8)


def test_the_simulators_observation_is_what_the_aloha_robot_takes():
    rng = np.random.default_rng(0)
    sim = {"pixels": {"top": rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)}, "agent_pos": rng.normal(size=14)}
    physics = FakePhysics()
    obs = robot_observation(sim, physics, "render", "insert the peg into the socket")
    assert physics.asked == ["left_wrist", "right_wrist"]
    request = RobotTransform("aloha", load_spec(SPEC).robots["aloha"], views=3).request(obs)
    assert request[io.IMAGES].shape == (1, 3, 224, 224, 3)
    assert np.allclose(request[io.STATE][0, :14], sim["agent_pos"]) and not request[io.STATE][0, 14:].any()
    black = robot_observation(sim, FakePhysics(), "black", "x")
    assert not black["images"]["cam_left_wrist"].any() and black["images"]["cam_left_wrist"].shape == (3, 224, 224)


@pytest.mark.parametrize("argv", [["--replan", "0"], ["--replan", "51"], ["--steps", "0"]])
def test_bad_options_are_refused_before_anything_starts(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and "expected" in capsys.readouterr().err
