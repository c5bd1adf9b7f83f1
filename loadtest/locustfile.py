"""Locust users that drive the policy through tritonclient and report every call to Locust.

    locust -f loadtest/locustfile.py --headless -u 8 -r 8 -t 20s --host 127.0.0.1:8001 \
        --vla-protocol grpc --vla-mode closed

Modes: ``robot`` asks at a fixed rate per user (``--vla-rate-hz``, a control loop consuming action
chunks); ``closed`` asks again as soon as the answer comes. Each user builds its request once
(camera-like frames, a state, a prompt), not per call. gRPC is made gevent-friendly the way
Locust's own gRPC example does; HTTP uses tritonclient's geventhttpclient-based client.
"""

from __future__ import annotations

import time

import grpc.experimental.gevent as grpc_gevent
from locust import User, events, task
from locust.exception import StopUser

from loadtest.users import Paced, add_pacing_arguments
from vlaserve import interface as io
from vlaserve.client import PolicyClient, error_line, make_request, readiness_problem

grpc_gevent.init_gevent()  # before any channel exists


@events.init_command_line_parser.add_listener
def _arguments(parser):
    group = parser.add_argument_group("vlaserve")
    group.add_argument(
        "--vla-protocol",
        choices=["grpc", "http"],
        default="http",
        help="tritonclient protocol (default: http, the cheaper one per request for the load generator, see docs/BENCHMARKS.md)",
    )
    add_pacing_arguments(group)
    group.add_argument("--vla-batch", type=int, default=1, help="items per request")
    group.add_argument("--vla-model", default=io.POLICY, help="model to call")
    group.add_argument("--vla-priority", type=int, default=0, help="request priority (0 = the model's default)")


@events.test_start.add_listener
def _check_server(environment, **_):
    """Fail fast, in one line, when the server is down or the model is unknown."""
    opts = environment.parsed_options
    if opts is None or environment.host is None:
        return
    problem = readiness_problem(environment.host, opts.vla_protocol, opts.vla_model)
    if problem:
        print(f"loadtest: error: {problem}", flush=True)
        environment.process_exit_code = 2
        if environment.runner is not None:
            environment.runner.quit()


class PolicyUser(Paced, User):
    """One robot (or evaluation worker) asking the policy for action chunks."""

    def on_start(self):
        opts = self.environment.parsed_options
        self.opts = opts
        try:
            self.client = PolicyClient(self.host, opts.vla_protocol, opts.vla_model)
            views = self.client.views()
        except Exception as exc:  # noqa: BLE001
            print(f"loadtest: error: {error_line(exc)}", flush=True)
            raise StopUser() from None
        self.request = make_request(opts.vla_batch, views, seed=id(self) % 2**31)
        self.name = f"{opts.vla_model} batch {opts.vla_batch}"

    def on_stop(self):
        client = getattr(self, "client", None)
        if client is not None:
            client.client.close()  # an open gRPC channel would keep the process from exiting

    @task
    def infer(self):
        start = time.perf_counter()
        exception, length = None, 0
        try:
            length = self.client.infer(self.request, self.opts.vla_priority).nbytes
        except Exception as exc:  # noqa: BLE001 - every failure is reported to Locust, not raised
            # by its status and message: Locust groups failures by the exception's repr, and a
            # tritonclient exception's repr is empty
            exception = RuntimeError(error_line(exc))
        self.report(self.opts.vla_protocol, start, length, exception, self.opts.vla_batch)
