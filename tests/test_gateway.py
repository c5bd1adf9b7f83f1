"""The openpi-compatible gateway (vlaserve.gateway) with openpi's own client package, over a real tritonserver."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import websockets.exceptions
from openpi_client import action_chunk_broker, websocket_client_policy

from tests.conftest import ROOT, SPEC
from tests.test_robots import droid_obs
from vlaserve.client import PolicyClient
from vlaserve.robots import RobotTransform
from vlaserve.server import free_port, free_ports
from vlaserve.spec import load_spec


def start_gateway(server, robot: str = "droid", port: int | None = None, triton: str | None = None):
    port = port or free_port()
    command = [sys.executable, "-m", "vlaserve.gateway", "--robot", robot, "--triton", triton or server.grpc_url,
               "--port", str(port)]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"gateway exited {process.returncode}: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                if response.status == 200:
                    return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("the gateway did not become healthy")


@pytest.fixture(scope="module")
def gateway(server):
    # Triton named as the Helm chart names it (dns:///: round robin over what the name resolves to)
    process, port = start_gateway(server, triton=f"dns:///{server.grpc_url}")
    yield port
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


def metric(port: int, name: str, outcome: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.search(rf'^{name}{{outcome="{outcome}"}} ([0-9.e+]+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_an_openpi_client_gets_the_actions_triton_computes(gateway, server):
    client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=gateway)
    meta = client.get_server_metadata()
    assert meta["server"] == "vlaserve" and meta["robot"] == "droid" and meta["action_horizon"] == 50
    rng = np.random.default_rng(0)
    obs = {**droid_obs(rng), "noise": rng.standard_normal((50, 32), dtype=np.float32)}
    result = client.infer(obs)
    assert result["actions"].shape == (50, 8) and result["actions"].dtype == np.float32
    assert result["server_timing"]["infer_ms"] > 0
    robot = RobotTransform("droid", load_spec(SPEC).robots["droid"], views=2)
    direct = PolicyClient(server.grpc_url).infer(robot.request(obs))[0, :, :8]
    np.testing.assert_allclose(result["actions"], direct, rtol=1e-5, atol=1e-6)  # the same request, through Triton
    assert np.abs(direct).mean() > 0.1
    second = client.infer(droid_obs(rng))  # no noise: the server draws it
    assert "prev_total_ms" in second["server_timing"] and not np.allclose(second["actions"], result["actions"])


def test_many_robots_are_batched_by_triton(gateway, server):
    stats = PolicyClient(server.grpc_url)
    before = stats.statistics("encoder")
    barrier = threading.Barrier(8, timeout=60)  # a robot that cannot connect fails the test, not hangs it
    errors = []

    def robot(i):
        try:
            client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=gateway)
            rng = np.random.default_rng(100 + i)
            barrier.wait()
            for _ in range(3):
                assert client.infer(droid_obs(rng))["actions"].shape == (50, 8)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=robot, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    after = stats.statistics("encoder")
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 24 and executions < inferences, (inferences, executions)  # batches of more than one


def test_the_action_chunk_broker_steps_through_one_chunk_per_call(gateway):
    client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=gateway)
    before = metric(gateway, "vlaserve_gateway_requests_total", "ok")
    broker = action_chunk_broker.ActionChunkBroker(client, action_horizon=50)
    rng = np.random.default_rng(3)
    steps = [broker.infer(droid_obs(rng))["actions"] for _ in range(60)]
    assert all(s.shape == (8,) for s in steps)
    assert metric(gateway, "vlaserve_gateway_requests_total", "ok") - before == 2  # steps 0 and 50 asked the server
    assert not np.allclose(steps[0], steps[1])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda o: o.pop("observation/exterior_image_1_left"), "observation/exterior_image_1_left: got 'missing'"),
        (lambda o: o.update({"observation/wrist_image_left": np.zeros((224, 224, 3), np.float64)}), "expected uint8"),
        (lambda o: o.update({"observation/wrist_image_left": np.zeros((5, 224, 224), np.uint8)}), "expected [H, W, 3]"),
        (lambda o: o["observation/joint_position"].__setitem__(0, np.nan), "expected finite numbers"),
        (lambda o: o.update({"observation/gripper_position": np.zeros(3)}), "expected 8 (state_dim)"),
    ],
)  # fmt: skip
def test_a_bad_observation_gets_an_error_frame_and_the_connection_stays_usable(gateway, edit, message):
    client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=gateway)
    rng = np.random.default_rng(4)
    bad = droid_obs(rng)
    edit(bad)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        client.infer(bad)
    assert client.infer(droid_obs(rng))["actions"].shape == (50, 8)  # the same connection answers again
    assert metric(gateway, "vlaserve_gateway_requests_total", "bad_observation") >= 1


def test_priority_is_declared_in_the_url(gateway):
    client = websocket_client_policy.WebsocketClientPolicy(host=f"ws://127.0.0.1:{gateway}/?priority=control")
    assert client.infer(droid_obs(np.random.default_rng(5)))["actions"].shape == (50, 8)
    with pytest.raises(Exception, match="priority"):  # refused at once, with the reason in the close frame
        websocket_client_policy.WebsocketClientPolicy(host=f"ws://127.0.0.1:{gateway}/?priority=urgent")


def test_a_robot_that_does_not_fit_the_served_policy_is_refused_at_start(server):
    done = subprocess.run([sys.executable, "-m", "vlaserve.gateway", "--robot", "aloha", "--triton", server.grpc_url,
                           "--port", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "robots.aloha.images" in done.stderr and "takes 2 views" in done.stderr
    done = subprocess.run([sys.executable, "-m", "vlaserve.gateway", "--robot", "franka"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "--robot: got 'franka', expected one of ['aloha', 'droid']" in done.stderr


def test_sigterm_answers_what_is_in_flight_then_closes(server):
    process, port = start_gateway(server)
    client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)
    result = {}

    def ask():
        result["actions"] = client.infer(droid_obs(np.random.default_rng(6)))["actions"]

    asker = threading.Thread(target=ask)
    asker.start()
    time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    asker.join(timeout=60)
    assert process.wait(timeout=60) == 0
    assert result["actions"].shape == (50, 8)  # answered before the gateway went
    assert "stopped" in process.stdout.read()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_a_robot_connects_again_after_the_gateway_restarts(server):
    """openpi-client 0.1.2 has no reconnect of its own: once the gateway restarts on its port, the robot's old
    connection is closed, and a new client to the same URL (what a robot's supervisor makes) is served."""
    process, port = start_gateway(server)
    rng = np.random.default_rng(9)
    client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)
    assert client.infer(droid_obs(rng))["actions"].shape == (50, 8)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    with pytest.raises(websockets.exceptions.ConnectionClosed):
        client.infer(droid_obs(rng))
    process, _ = start_gateway(server, port=port)
    try:
        again = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)
        assert again.infer(droid_obs(rng))["actions"].shape == (50, 8)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_a_hostile_frame_is_refused_and_other_robots_keep_being_served(gateway):
    """An object-dtype array (its bytes would be read as pointers), a frame that is not msgpack, a text frame,
    a frame over the size limit: each is answered or closed alone; another robot is served throughout."""
    import msgpack
    from websockets.sync.client import connect

    other = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=gateway)
    rng = np.random.default_rng(7)
    pointers = {b"__ndarray__": True, b"data": b"\x01" * 8, b"dtype": "|O", b"shape": (1,)}
    with connect(f"ws://127.0.0.1:{gateway}", max_size=None) as ws:
        ws.recv()  # the metadata
        for frame, expected in (
            (msgpack.packb({"observation/joint_position": [pointers]}), "dtype object is not accepted"),
            (b"\xc1 not msgpack", "not msgpack-numpy"),
            ("a text frame", "expected msgpack bytes"),
        ):
            ws.send(frame)
            answer = ws.recv()
            assert isinstance(answer, str) and expected in answer, answer
            assert other.infer(droid_obs(rng))["actions"].shape == (50, 8)
        ws.send(b"\x00" * (65 << 20))  # over the 64 MiB limit: this connection is closed (1009), no other
        with pytest.raises(Exception, match="1009|too big"):
            ws.recv()
    assert other.infer(droid_obs(rng))["actions"].shape == (50, 8)


def test_the_load_test_drives_robots_through_the_gateway(gateway, server, tmp_path):
    """make loadtest ARGS="--protocol gateway": Locust robots (WebSocket, the spec's droid observation) against
    the gateway, Triton's own metrics scraped around each step."""
    from loadtest import sweep

    summary = sweep.run(sweep.parse_args(["--protocol", "gateway", "--host", f"127.0.0.1:{gateway}", "--users", "2",
                                          "--duration", "4", "--metrics-url", server.metrics_url,
                                          "--out", str(tmp_path)]))  # fmt: skip
    step = summary["results"]["sweep"][0]
    assert step["failures"] == 0 and step["requests"] > 2 and step["throughput"] > 0, step
    assert step["server"]["models"]["encoder"]["requests"] >= step["requests"]  # every answer came from Triton


def test_a_triton_restart_is_an_error_frame_and_the_connection_lives_on(tiny_repo, tmp_path):
    """Triton goes down under a connected robot: its observations are answered with an error frame, not a
    dropped connection, /healthz says 503; once Triton is back on its address the same connection is served."""
    from vlaserve.server import ServerOptions, TritonServer

    http, grpc, metrics_port = free_ports(3)

    def triton():
        options = ServerOptions(model_repository=tiny_repo, http_port=http, grpc_port=grpc, metrics_port=metrics_port,
                                workdir=tmp_path / "work", ready_timeout=120)  # fmt: skip
        return TritonServer(options).start()

    first = triton()
    process, port = start_gateway(first)
    try:
        client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=port)
        rng = np.random.default_rng(8)
        assert client.infer(droid_obs(rng))["actions"].shape == (50, 8)
        first.stop()
        with pytest.raises(RuntimeError, match="the policy on Triton failed"):
            client.infer(droid_obs(rng))
        with pytest.raises(urllib.error.HTTPError, match="503"):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        second = triton()
        try:
            deadline = time.monotonic() + 30
            while True:  # gRPC reconnects on its own schedule: a few tries
                try:
                    assert client.infer(droid_obs(rng))["actions"].shape == (50, 8)
                    break
                except RuntimeError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
        finally:
            second.stop()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
