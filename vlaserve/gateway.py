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
- each connection reads at most ``--max-queue`` frames ahead of the one being answered;
- ``GET /healthz`` (200 when Triton's policy is ready, else 503) and ``GET /metrics`` (Prometheus: the
  gateway's connections, requests by outcome and latency) on the same port;
- SIGTERM: no new connections; the open ones are answered until none has been busy for a quarter of a
  second (an observation already sent is answered), then each is closed with 1001 (going away).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
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

QUIET_S = 0.25  # at SIGTERM: connections idle this long are closed (see Gateway.serve)
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


def _unpack_array(obj):
    if b"__ndarray__" in obj:
        return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
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

    def __init__(self, triton_url: str, robot: RobotTransform, timeout_s: float = 30.0, model: str = io.POLICY):
        self.triton_url, self.robot, self.timeout_s, self.model = triton_url, robot, timeout_s, model
        self.metrics = Metrics()
        self.in_flight = 0
        self.last_activity = 0.0  # monotonic time a frame was last read or answered
        self.client = None

    async def start_client(self):
        import tritonclient.grpc.aio as grpcclient

        self.grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(self.triton_url)

    async def infer(self, request: dict[str, np.ndarray], priority: int) -> np.ndarray:
        from tritonclient.utils import np_to_triton_dtype

        inputs = []
        for name, array in request.items():
            tensor = self.grpc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        result = await self.client.infer(
            self.model, inputs, outputs=[self.grpc.InferRequestedOutput(io.ACTIONS)], priority=priority,
            client_timeout=self.timeout_s,
        )  # fmt: skip
        return result.as_numpy(io.ACTIONS)[0]

    async def ready(self) -> bool:
        try:
            return bool(await self.client.is_model_ready(self.model))
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
                started = self.last_activity = time.monotonic()
                reply, outcome = await self._answer(message, priority, previous_total)
                await ws.send(reply)
                self.last_activity = time.monotonic()
                self.metrics.requests.labels(outcome).inc()
                if outcome == "ok":
                    previous_total = time.monotonic() - started
                    self.metrics.latency.observe(previous_total)
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
        try:
            request = self.robot.request(unpackb(message))
        except ObservationError as exc:
            return f"vlaserve gateway: bad observation: {exc}", "bad_observation"
        except Exception as exc:  # noqa: BLE001 - not msgpack at all
            return f"vlaserve gateway: observation: not msgpack-numpy ({type(exc).__name__}: {exc})", "bad_observation"
        self.in_flight += 1
        try:
            started = time.monotonic()
            actions = await self.infer(request, priority)
        except Exception as exc:  # noqa: BLE001 - Triton's answer (overload, a bad tensor, down) goes to the robot
            return f"vlaserve gateway: the policy on Triton failed: {exc}", "error"
        finally:
            self.in_flight -= 1
        result = self.robot.result(actions)
        result["server_timing"] = {"infer_ms": (time.monotonic() - started) * 1e3}
        if previous_total is not None:
            result["server_timing"]["prev_total_ms"] = previous_total * 1e3
        return packb(result), "ok"

    async def serve(self, host: str, port: int, max_queue: int, stop: asyncio.Event, started=None) -> None:
        from websockets.asyncio.server import serve

        await self.start_client()
        async with serve(self.handler, host, port, process_request=self.process_request, max_size=None,
                         max_queue=max_queue, compression=None) as server:  # fmt: skip
            bound = server.sockets[0].getsockname()[1]
            print(f"[gateway] robot {self.robot.name!r}: ws://{host}:{bound} -> Triton {self.triton_url} "
                  f"({self.model}); /healthz and /metrics on the same port", flush=True)  # fmt: skip
            if started is not None:
                started(bound)
            await stop.wait()
            print("[gateway] stopping: no new connections; answering the requests in flight ...", flush=True)
            server.close(close_connections=False)
            # Open connections are still read and answered until none has been busy for QUIET_S (a frame
            # already sent when the signal came is read within it), or the timeout.
            self.last_activity = max(self.last_activity, time.monotonic())
            deadline = time.monotonic() + self.timeout_s
            while time.monotonic() < deadline and (self.in_flight or time.monotonic() - self.last_activity < QUIET_S):
                await asyncio.sleep(0.02)
            for connection in list(server.connections):
                await connection.close(1001, "the gateway is shutting down")
        await self.client.close()
        print("[gateway] stopped", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vlaserve.gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--robot", required=True, help="the robot's settings, by name, from the spec's robots: section")
    parser.add_argument("--triton", default=f"{io.DEFAULT_HOST}:{io.GRPC_PORT}", help="Triton's gRPC address")
    parser.add_argument("--host", default=io.DEFAULT_HOST, help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument(
        "--port", type=int, default=io.GATEWAY_PORT, help=f"port (default {io.GATEWAY_PORT}; 0: any free)"
    )
    parser.add_argument("--spec", default=str(DEFAULT_SPEC), help="the spec with the robots: section")
    parser.add_argument("--max-queue", type=int, default=4, help="frames a connection may send ahead (default 4)")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="per request to Triton, and for the drain")
    parser.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for Triton's policy at start")
    return parser.parse_args(argv)


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
        if args.max_queue < 1:
            raise VlaserveError("--max-queue", args.max_queue, "a positive integer")
        views = _served_views(args.triton, args.wait_s)
        robot = RobotTransform(args.robot, spec.robots[args.robot], views, Path(args.spec).parent)
    except VlaserveError as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Gateway(args.triton, robot, args.timeout_s).serve(args.host, args.port, args.max_queue, stop)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
