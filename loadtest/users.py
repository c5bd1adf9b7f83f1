"""What the Locust users of loadtest/locustfile.py and loadtest/gateway_locustfile.py share: their pacing
options and how a call is reported to Locust. Imported by locustfiles only (it imports Locust)."""

from __future__ import annotations

import time

from locust import constant_pacing

from loadtest import FAILED_SUFFIX


def add_pacing_arguments(group) -> None:
    group.add_argument("--vla-mode", choices=["robot", "closed"], default="closed", help="fixed rate or closed loop")
    group.add_argument("--vla-rate-hz", type=float, default=10.0, help="requests per second per user in robot mode")


class Paced:
    """A Locust user mixin: ``closed`` asks again at once, ``robot`` at ``--vla-rate-hz``; :meth:`report`
    tells Locust how one call went. The user sets ``self.opts`` (the parsed options) and ``self.name``."""

    def wait_time(self):  # Locust calls this between tasks
        if self.opts.vla_mode == "closed":
            return 0
        return constant_pacing(1.0 / self.opts.vla_rate_hz)(self)

    def report(self, request_type: str, started: float, length: int, exception: Exception | None, batch: int = 1):
        """One call, started at ``started`` (perf_counter). Failures go under a name of their own, so that the
        latency percentiles are those of answers (a fast rejection would otherwise pull them down)."""
        self.environment.events.request.fire(
            request_type=request_type,
            name=self.name if exception is None else f"{self.name}{FAILED_SUFFIX}",
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=length,
            exception=exception,
            context={"batch": batch},
        )
