"""A simulated ALOHA (gym-aloha, MuJoCo) driven through a running gateway at its control rate, with openpi's client.

    make export VIEWS=3 && make serve          # the aloha robot has three cameras
    make gateway ROBOT=aloha                   # ws://127.0.0.1:8003
    make aloha-sim ARGS="--steps 200 --fast"   # in .venv-sim (gym-aloha, MuJoCo), headless

Each control step sends the simulator's observation as the gateway's ``aloha`` robot expects it
(spec.yaml ``robots: aloha``: three CHW uint8 frames and the 14 joint positions) through openpi's
action-chunk broker, which asks the gateway for a new 50-action chunk every ``--replan`` steps and plays
the chunk's actions in between. It paces the loop at the simulator's control rate (50 Hz) and reports
the rate achieved, the time of each step and the round trip of each policy call.

gym-aloha returns one camera (``top``, 480 x 640 HWC) and ``agent_pos`` (14 values); the two wrist views
the aloha robot also has are rendered here from the scene's own ``left_wrist`` and ``right_wrist`` cameras
(``--wrist black`` sends black frames instead). Frames are resized and padded to 224 x 224 before they are
sent. Without a GPU, MuJoCo renders in software (``MUJOCO_GL=egl``, Mesa's llvmpipe; ``osmesa`` also
works where libOSMesa is installed): the simulator's own step renders three 640 x 480 cameras, one with
a 4096-pixel shadow map, and that, not the policy, sets the rate. ``--fast`` renders only the cameras
used, without shadows.

The policy's weights are random unless exported from a checkpoint: the arms move, the task is not solved.
``--clip`` keeps the actions within the simulator's action space, outside of which random actions can make
the physics diverge (that is counted and the episode restarted).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from vlaserve.interface import GATEWAY_PORT

TASKS = {
    "insertion": ("gym_aloha/AlohaInsertion-v0", "insert the peg into the socket"),
    "transfer_cube": ("gym_aloha/AlohaTransferCube-v0", "transfer the cube"),
}
WRIST_CAMERAS = ("left_wrist", "right_wrist")


class TimedPolicy:
    """The websocket policy, timing each call to the gateway (the broker makes one per chunk)."""

    def __init__(self, policy):
        self.policy, self.round_trip_ms, self.gateway_ms = policy, [], []

    def infer(self, obs):
        start = time.perf_counter()
        result = self.policy.infer(obs)
        self.round_trip_ms.append((time.perf_counter() - start) * 1000)
        self.gateway_ms.append(result.get("server_timing", {}).get("infer_ms", float("nan")))
        return result

    def reset(self):
        self.policy.reset()


def make_env(task: str, fast: bool):
    import gym_aloha  # noqa: F401  (registers the gym_aloha/* environments)
    import gymnasium as gym

    env = gym.make(TASKS[task][0], obs_type="pixels_agent_pos")
    inner = env.unwrapped._env
    if fast:
        dm_task = inner.task

        def observation(physics):  # the simulator's own renders top, angle and front_close
            return {"qpos": dm_task.get_qpos(physics), "qvel": dm_task.get_qvel(physics),
                    "env_state": dm_task.get_env_state(physics),
                    "images": {"top": physics.render(height=480, width=640, camera_id="top")}}  # fmt: skip

        dm_task.get_observation = observation
        inner.physics.model.light_castshadow[:] = 0
    return env, inner.physics


def chw224(frame: np.ndarray) -> np.ndarray:
    from openpi_client import image_tools

    return np.ascontiguousarray(image_tools.resize_with_pad(frame, 224, 224).transpose(2, 0, 1))


def robot_observation(obs: dict, physics, wrist: str, prompt: str) -> dict:
    """The simulator's observation as the gateway's aloha robot takes it."""
    if wrist == "render":  # 168 x 224 keeps the cameras' 4:3 shape: the resize only pads
        wrists = [physics.render(height=168, width=224, camera_id=camera) for camera in WRIST_CAMERAS]
    else:
        wrists = [np.zeros((224, 224, 3), np.uint8)] * 2
    return {
        "images": {
            "cam_high": chw224(obs["pixels"]["top"]),
            "cam_left_wrist": chw224(wrists[0]),
            "cam_right_wrist": chw224(wrists[1]),
        },  # fmt: skip
        "state": np.asarray(obs["agent_pos"], dtype=np.float32),
        "prompt": prompt,
    }


def summary(values_ms) -> str:
    values = np.asarray(values_ms, dtype=float)
    return f"p50 {np.nanmedian(values):.1f} ms, mean {np.nanmean(values):.1f}, max {np.nanmax(values):.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.aloha_sim", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="the gateway's host (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=GATEWAY_PORT, help=f"the gateway's port (default: {GATEWAY_PORT})")
    parser.add_argument("--task", choices=sorted(TASKS), default="insertion")
    parser.add_argument("--prompt", help="default: the task's")
    parser.add_argument("--steps", type=int, default=100, help="control steps (default: 100)")
    parser.add_argument("--replan", type=int, default=50, help="actions played per chunk, 1-50 (default: 50)")
    parser.add_argument("--fps", type=float, help="control rate (default: the simulator's, 50 Hz)")
    parser.add_argument("--wrist", choices=["render", "black"], default="render", help="the wrist views")
    parser.add_argument("--fast", action="store_true", help="render only the cameras used, without shadows")
    parser.add_argument("--clip", action="store_true", help="keep actions within the action space")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 1 <= args.replan <= 50 or args.steps < 1:
        parser.error(f"--replan: got {args.replan}, expected 1..50; --steps: got {args.steps}, expected >= 1")
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless, before MuJoCo's renderer loads
    from dm_control.rl.control import PhysicsError
    from openpi_client import action_chunk_broker, websocket_client_policy

    env, physics = make_env(args.task, args.fast)
    fps = args.fps or env.metadata["render_fps"]
    prompt = args.prompt or TASKS[args.task][1]
    print(f"[aloha] connecting to ws://{args.host}:{args.port} ...", flush=True)
    client = websocket_client_policy.WebsocketClientPolicy(host=args.host, port=args.port)
    print(f"[aloha] gateway: {client.get_server_metadata()}; MUJOCO_GL={os.environ['MUJOCO_GL']}, {fps:g} Hz")
    timed = TimedPolicy(client)
    broker = action_chunk_broker.ActionChunkBroker(timed, action_horizon=args.replan)

    obs, _ = env.reset(seed=args.seed)
    period = 1.0 / fps
    step_ms, sim_ms, late, diverged = [], [], 0, 0
    start = next_tick = time.perf_counter()
    for step in range(args.steps):
        t0 = time.perf_counter()
        action = broker.infer(robot_observation(obs, physics, args.wrist, prompt))["actions"]
        if action.shape != (14,):
            raise SystemExit(f"aloha-sim: error: the gateway answered actions of shape {action.shape}, expected (14,)")
        if args.clip:
            action = np.clip(action, env.action_space.low, env.action_space.high)
        t1 = time.perf_counter()
        try:
            obs, _, terminated, truncated, _ = env.step(action.astype(np.float64))
        except PhysicsError as exc:
            print(f"[aloha] step {step}: the simulation diverged ({exc}); a new episode", flush=True)
            diverged, terminated, truncated = diverged + 1, True, False
        sim_ms.append((time.perf_counter() - t1) * 1000)
        if terminated or truncated:
            obs, _ = env.reset()
            broker.reset()
        next_tick += period
        wait = next_tick - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        else:
            late += 1
            next_tick = time.perf_counter()  # behind: no catching up
        step_ms.append((time.perf_counter() - t0) * 1000)
        if (step + 1) % 50 == 0:
            print(f"[aloha] {step + 1}/{args.steps} steps", flush=True)
    total = time.perf_counter() - start

    print(f"[aloha] {args.steps} steps in {total:.1f} s: {args.steps / total:.1f} Hz achieved of {fps:g} Hz "
          f"({late} steps over their period)")  # fmt: skip
    print(f"[aloha] control step: {summary(step_ms)}")
    print(f"[aloha] simulator step (physics and rendering): {summary(sim_ms)}")
    print(f"[aloha] policy calls: {len(timed.round_trip_ms)}, round trip {summary(timed.round_trip_ms)}; "
          f"gateway's own time {summary(timed.gateway_ms)}")  # fmt: skip
    print(f"[aloha] the simulation diverged {diverged} time(s)")
    env.close()
    physics.free()  # before exit: dm_control's own exit hook can fail otherwise
    return 0


if __name__ == "__main__":
    sys.exit(main())
