"""``python -m vlaserve.gateway``: openpi's policy-server protocol in front of Triton, so robots plug in unchanged.

A robot that runs openpi's client (``openpi_client.websocket_client_policy.WebsocketClientPolicy``) connects
over WebSocket, receives the server's metadata (msgpack), then sends observations (msgpack with numpy
arrays, openpi's ``msgpack_numpy`` format) and receives ``{"actions": [50, action_dim], "server_timing":
...}`` for each. The gateway turns each observation into a request to the ``policy`` model through its
robot's transforms (:mod:`vlaserve.robots`) and sends it to Triton over async gRPC, so the requests of many
robots meet in Triton's dynamic batcher.

Beyond openpi's own server:
- a bad observation (missing key, wrong dtype or shape, NaN) or a failed request is answered with a text
  frame naming what was wrong, which openpi's client raises as an error, and the connection stays usable
  (openpi's server closes it);
- a connection may say how urgent it is: ``ws://host:port/?priority=control`` (Triton priority 1) or
  ``background`` (2, the default);
- each connection reads at most ``--max-queue`` frames ahead of the one being answered, each at most
  ``--max-size-mb``; a frame's decoding and transforms run off the event loop;
- ``GET /healthz`` (200 when Triton's policy is ready, else 503) and ``GET /metrics`` (Prometheus: the
  gateway's connections, requests by outcome and latency) on the same port;
- SIGTERM: no new connections; frames already on their way are read for a quarter of a second, every
  answer being computed is sent (for up to ``--drain-s``), then each connection is closed with 1001 (going
  away). A second signal ends the process at once.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import signal
import sys
import time
import urllib.parse
from pathlib import Path

import msgpack
import numpy as np
from websockets.exceptions import ConnectionClosed

from vlaserve import interface as io
from vlaserve.errors import VlaserveError
from vlaserve.robots import ObservationError, RobotTransform

QUIET_S = 0.25  # at SIGTERM: how long frames already on their way are still read (see Gateway.serve)
PRIORITIES = {"control": 1, "background": 2}  # Triton priority levels of the policy (spec priority_levels: 2)
DEFAULT_SPEC = Path(__file__).resolve().parents[1] / "model_repository" / "spec.yaml"


# ---- openpi's wire format: msgpack with numpy arrays as {__ndarray__, data, dtype, shape} ----------------
def _pack_array(obj):
    if isinstance(obj, np.ndarray | np.generic) and obj.dtype.kind in ("V", "O", "c"):
        raise ValueError(f"unsupported dtype {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


WIRE_KINDS = "biufSU"  # numbers, booleans and strings; never objects (their bytes would be read as pointers)


def _wire_dtype(text) -> np.dtype:
    dtype = np.dtype(text)
    if dtype.hasobject or dtype.kind not in WIRE_KINDS:
        raise ValueError(f"dtype {dtype} is not accepted (numbers, booleans or strings only)")
    return dtype


def _unpack_array(obj):
    if b"__ndarray__" in obj:
        return np.ndarray(buffer=obj[b"data"], dtype=_wire_dtype(obj[b"dtype"]), shape=obj[b"shape"])
    if b"__npgeneric__" in obj:
        return _wire_dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


packb = functools.partial(msgpack.packb, default=_pack_array)
unpackb = functools.partial(msgpack.unpackb, object_hook=_unpack_array)


class Metrics:
    """The gateway's own Prometheus figures (beside Triton's)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.connections = Counter("vlaserve_gateway_connections", "Connections opened", registry=self.registry)
        self.open = Gauge("vlaserve_gateway_open_connections", "Connections open now", registry=self.registry)
        self.requests = Counter("vlaserve_gateway_requests", "Observations answered, by outcome", ["outcome"],
                                registry=self.registry)  # fmt: skip
        self.latency = Histogram("vlaserve_gateway_request_seconds", "Observation in to actions out, answered ones",
                                 buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5), registry=self.registry)  # fmt: skip

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Gateway:
    """The WebSocket server: one handler per robot connection, one async gRPC client to Triton for all."""

    def __init__(self, triton_url: str, robot: RobotTransform, timeout_s: float = 30.0, model: str = io.POLICY,
                 drain_s: float = 10.0):  # fmt: skip
        self.triton_url, self.robot, self.timeout_s, self.model = triton_url, robot, timeout_s, model
        self.drain_s = drain_s
        self.metrics = Metrics()
        self.busy: set = set()  # connections computing an answer now
        self.stopping = False
        self.client = None

    async def start_client(self):
        import tritonclient.grpc.aio as grpcclient

        self.grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(self.triton_url, channel_args=channel_args(grpcclient))

    async def infer(self, request: dict[str, np.ndarray], priority: int) -> np.ndarray:
        from vlaserve.client import infer_inputs

        result = await self.client.infer(
            self.model, infer_inputs(self.grpc, request), outputs=[self.grpc.InferRequestedOutput(io.ACTIONS)], priority=priority,
            client_timeout=self.timeout_s,
        )  # fmt: skip
        return result.as_numpy(io.ACTIONS)[0]

    async def ready(self) -> bool:
        try:
            return bool(await self.client.is_model_ready(self.model, client_timeout=2.0))
        except Exception:  # noqa: BLE001 - Triton down or unreachable: not ready
            return False

    async def process_request(self, connection, request):
        """Plain HTTP on the same port: /healthz and /metrics; a WebSocket handshake goes on (None)."""
        path = urllib.parse.urlparse(request.path).path
        if path == "/healthz":
            ok = await self.ready()
            return connection.respond(200 if ok else 503, "ok\n" if ok else f"{self.model} not ready on Triton\n")
        if path == "/metrics":
            from websockets.datastructures import Headers
            from websockets.http11 import Response

            body = self.metrics.text()
            headers = Headers([("Content-Type", "text/plain; version=0.0.4"), ("Content-Length", str(len(body)))])
            return Response(200, "OK", headers, body)
        return None

    async def handler(self, ws):
        query = urllib.parse.parse_qs(urllib.parse.urlparse(ws.request.path).query)
        level = query.get("priority", ["background"])[0]
        if level not in PRIORITIES:
            await ws.close(1008, f"priority: got {level!r}, expected one of {list(PRIORITIES)}")
            return
        priority = PRIORITIES[level]
        self.metrics.connections.inc()
        self.metrics.open.inc()
        try:
            await ws.send(packb(self.robot.metadata()))
            previous_total = None
            async for message in ws:
                started = time.monotonic()
                self.busy.add(ws)
                try:
                    reply, outcome = await self._answer(message, priority, previous_total)
                    await ws.send(reply)
                finally:
                    self.busy.discard(ws)
                self.metrics.requests.labels(outcome).inc()
                if outcome == "ok":
                    previous_total = time.monotonic() - started
                    self.metrics.latency.observe(previous_total)
                if self.stopping:  # answered; now this connection goes
                    await ws.close(1001, "the gateway is shutting down")
                    return
        except ConnectionClosed:  # the robot went away, or the gateway is stopping
            pass
        except Exception as exc:  # noqa: BLE001 - a fault of the gateway's: this connection ends, loudly
            print(f"[gateway] connection closed on an internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
            await ws.close(1011, f"internal error: {type(exc).__name__}")
        finally:
            self.metrics.open.dec()

    async def _answer(self, message, priority: int, previous_total: float | None) -> tuple[bytes | str, str]:
        """The reply frame for one message (actions, or a text frame saying what was wrong) and its outcome."""
        if isinstance(message, str):
            return "vlaserve gateway: observation: got a text frame, expected msgpack bytes", "bad_observation"
        try:  # off the event loop: a large frame's resize must not hold up the other robots' replies
            request = await asyncio.to_thread(lambda: self.robot.request(unpackb(message)))
        except ObservationError as exc:
            return f"vlaserve gateway: bad observation: {exc}", "bad_observation"
        except Exception as exc:  # noqa: BLE001 - not msgpack at all
            return f"vlaserve gateway: observation: not msgpack-numpy ({type(exc).__name__}: {exc})", "bad_observation"
        try:
            started = time.monotonic()
            actions = await self.infer(request, priority)
        except Exception as exc:  # noqa: BLE001 - Triton's answer (overload, a bad tensor, down) goes to the robot
            return f"vlaserve gateway: the policy on Triton failed: {exc}", "error"
        result = self.robot.result(actions)
        result["server_timing"] = {"infer_ms": (time.monotonic() - started) * 1e3}
        if previous_total is not None:
            result["server_timing"]["prev_total_ms"] = previous_total * 1e3
        return packb(result), "ok"

    async def serve(self, host: str, port: int, max_queue: int, stop: asyncio.Event, max_size: int = 64 << 20) -> None:
        from websockets.asyncio.server import serve

        await self.start_client()
        async with serve(self.handler, host, port, process_request=self.process_request, max_size=max_size,
                         max_queue=max_queue, compression=None) as server:  # fmt: skip
            bound = server.sockets[0].getsockname()[1]
            print(f"[gateway] robot {self.robot.name!r}: ws://{host}:{bound} -> Triton {self.triton_url} "
                  f"({self.model}); /healthz and /metrics on the same port", flush=True)  # fmt: skip
            await stop.wait()
            print("[gateway] stopping: no new connections; answering the requests in flight ...", flush=True)
            server.close(close_connections=False)
            self.stopping = True
            # A frame already on its way when the signal came is read within QUIET_S and answered; each
            # connection is closed once it has no answer to compute, all of them together.
            await asyncio.sleep(QUIET_S)
            deadline = time.monotonic() + self.drain_s
            while self.busy and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.gather(
                *(c.close(1001, "the gateway is shutting down") for c in list(server.connections)),
                return_exceptions=True,
            )
        await self.client.close()
        print("[gateway] stopped", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vlaserve.gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--robot", required=True, help="the robot's settings, by name, from the spec's robots: section")
    parser.add_argument(
        "--triton",
        default=f"{io.DEFAULT_HOST}:{io.GRPC_PORT}",
        help="Triton's gRPC address; dns:///NAME:PORT spreads requests over every address NAME resolves to",
    )
    parser.add_argument("--host", default=io.DEFAULT_HOST, help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument(
        "--port", type=int, default=io.GATEWAY_PORT, help=f"port (default {io.GATEWAY_PORT}; 0: any free)"
    )
    parser.add_argument("--spec", default=str(DEFAULT_SPEC), help="the spec with the robots: section")
    parser.add_argument("--max-queue", type=int, default=4, help="frames a connection may send ahead (default 4)")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="per request to Triton, and for the drain")
    parser.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for Triton's policy at start")
    parser.add_argument("--drain-s", type=float, default=10.0, help="at SIGTERM, how long answers in flight may take")
    parser.add_argument("--max-size-mb", type=float, default=64.0, help="the largest frame a robot may send (MiB)")
    return parser.parse_args(argv)


def channel_args(grpcclient) -> list[tuple]:
    """tritonclient's own channel options, with requests spread over every address the Triton name resolves
    to (round robin): behind a headless Kubernetes Service (``--triton dns:///<service>:8001``) that is every
    Triton pod, where one connection to a ClusterIP would pin all of this gateway's requests to one pod."""
    from tritonclient.grpc import KeepAliveOptions

    keepalive = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.lb_policy_name", "round_robin"),
    ]


def _served_views(url: str, wait_s: float) -> int:
    """The views the served policy takes (its metadata), once it is ready."""
    from vlaserve.client import PolicyClient, readiness_problem

    deadline = time.monotonic() + wait_s
    while (problem := readiness_problem(url, "grpc", io.POLICY)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if problem:
        raise VlaserveError("--triton", url, f"a Triton serving {io.POLICY} ({problem})")
    return PolicyClient(url).views()


def main(argv=None) -> int:
    args = parse_args(argv)
    from vlaserve.spec import load_spec

    try:
        spec = load_spec(Path(args.spec))
        if args.robot not in spec.robots:
            raise VlaserveError("--robot", args.robot, f"one of {sorted(spec.robots)} (the spec's robots: section)")
        for flag, value in (("--max-queue", args.max_queue), ("--max-size-mb", args.max_size_mb),
                            ("--drain-s", args.drain_s), ("--timeout-s", args.timeout_s)):  # fmt: skip
            if not value > 0:
                raise VlaserveError(flag, value, "a positive number")
        views = _served_views(args.triton, args.wait_s)
        robot = RobotTransform(args.robot, spec.robots[args.robot], views, Path(args.spec).parent)
    except VlaserveError as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal():
            if stop.is_set():  # a second signal: no more waiting
                os._exit(130)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        gateway = Gateway(args.triton, robot, args.timeout_s, drain_s=args.drain_s)
        await gateway.serve(args.host, args.port, args.max_queue, stop, int(args.max_size_mb * 2**20))

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
