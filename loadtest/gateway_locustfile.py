"""Locust users that drive the policy through the openpi-compatible gateway (vlaserve.gateway), as robots do.

    locust -f loadtest/gateway_locustfile.py --headless -u 8 -r 8 -t 20s --host 127.0.0.1:8003 --vla-robot droid

Each user is one robot: one WebSocket connection, the gateway's metadata read once, then one observation
(made once from the robot's settings in the spec: camera-like frames, a state, a prompt) sent per task and
its actions awaited, as openpi's client does. Modes as in loadtest/locustfile.py: ``closed`` asks again at
once, ``robot`` at ``--vla-rate-hz``. A text frame back (the gateway's error) is a failure.
"""

from __future__ import annotations

import time
from pathlib import Path

from locust import User, events, task
from locust.exception import StopUser

from loadtest.users import Paced, add_pacing_arguments
from vlaserve.gateway import packb, unpackb
from vlaserve.robots import example_observation
from vlaserve.spec import load_spec

SPEC = Path(__file__).resolve().parents[1] / "model_repository" / "spec.yaml"


@events.init_command_line_parser.add_listener
def _arguments(parser):
    group = parser.add_argument_group("vlaserve gateway")
    group.add_argument("--vla-robot", default="droid", help="the robot's settings in the spec (robots:)")
    add_pacing_arguments(group)
    group.add_argument("--vla-priority", choices=["control", "background"], default="background")


class GatewayRobot(Paced, User):
    """One robot asking the gateway for action chunks over its own connection."""

    def on_start(self):
        from websockets.sync.client import connect

        self.opts = opts = self.environment.parsed_options
        try:
            settings = load_spec(SPEC).robots[opts.vla_robot]
            self.ws = connect(f"ws://{self.host}/?priority={opts.vla_priority}", max_size=None, compression=None)
            unpackb(self.ws.recv())  # the gateway's metadata
        except Exception as exc:  # noqa: BLE001 - one line, then this user stops
            print(f"loadtest: error: gateway at {self.host}: {type(exc).__name__}: {exc}", flush=True)
            raise StopUser() from None
        self.payload = packb(example_observation(settings, seed=id(self) % 2**31))
        self.name = f"gateway {opts.vla_robot}"

    def on_stop(self):
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()

    @task
    def infer(self):
        start = time.perf_counter()
        exception, length = None, 0
        try:
            self.ws.send(self.payload)
            reply = self.ws.recv()
            if isinstance(reply, str):
                exception = RuntimeError(reply.splitlines()[0])
            else:
                length = unpackb(reply)["actions"].nbytes
        except Exception as exc:  # noqa: BLE001 - every failure is reported to Locust, not raised
            exception = RuntimeError(f"{type(exc).__name__}: {exc}")
        self.report("gateway", start, length, exception)
