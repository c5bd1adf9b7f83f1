"""The launcher keeps serving: a dead model instance or a dead tritonserver is restarted, and health tells the
truth meanwhile (real servers, started through the launcher's own command line)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tests.conftest import ROOT
from vlaserve import health
from vlaserve.client import PolicyClient, make_request
from vlaserve.server import free_ports, shm_files
from vlaserve.supervisor import dead_instances, process_alive


def wait_for(condition, timeout: float, step: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    return None


def test_process_alive_tells_a_zombie_from_a_live_process():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    quitter = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        assert wait_for(lambda: not process_alive(quitter.pid), 10)  # exited, not reaped yet: a zombie
        assert os.waitpid(quitter.pid, os.WNOHANG)[0] == quitter.pid  # it was one
        assert process_alive(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_health_needs_the_supervisor(tmp_path):
    assert "no supervisor health" in health.check(tmp_path, "http://127.0.0.1:9")


def test_a_killed_instance_and_a_killed_server_are_recovered(tiny_repo, tiny_policy, tmp_path):
    http, grpc, metrics = free_ports(3)
    workdir = tmp_path / "work"
    cmd = [sys.executable, "-m", "vlaserve.server", "--model-repository", str(tiny_repo), "--workdir", str(workdir),
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--health-interval", "0.5", "--ready-timeout", "120"]  # fmt: skip
    url = f"http://127.0.0.1:{http}"
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    request = make_request(2, views=2, seed=21, with_noise=True)
    with torch.no_grad():
        names = ("images", "tokens", "state", "noise")
        expected = tiny_policy(*(torch.from_numpy(request[k]) for k in names)).numpy()

    def answers_right():
        np.testing.assert_allclose(PolicyClient(f"127.0.0.1:{grpc}").infer(request), expected, atol=1e-4)
        return True

    try:
        assert wait_for(lambda: health.check(workdir, url) == "", 150), health.check(workdir, url)
        assert answers_right()
        stub = json.loads((workdir / "instances" / "decoder_cpu_1.json").read_text())["pid"]
        os.kill(stub, signal.SIGKILL)
        killed = time.monotonic()
        problem = wait_for(lambda: health.check(workdir, url), 5)  # unhealthy within a few checks
        assert problem and "decoder_cpu_1" in problem, problem
        assert wait_for(lambda: health.check(workdir, url) == "", 120), health.check(workdir, url)
        print(f"\ninstance recovery: {time.monotonic() - killed:.1f} s")
        assert dead_instances(workdir / "instances") == [] and answers_right()
        assert json.loads((workdir / "instances" / "decoder_cpu_1.json").read_text())["pid"] != stub

        server_pid = json.loads((workdir / "health.json").read_text())["pid"]
        stubs, segments = stubs_and_segments(workdir)
        assert len(stubs) == 4 and segments
        os.kill(server_pid, signal.SIGKILL)
        killed = time.monotonic()
        assert wait_for(lambda: "tritonserver exited (killed by signal 9)" in health.check(workdir, url), 5)
        assert wait_for(lambda: health.check(workdir, url) == "", 120), health.check(workdir, url)
        print(f"server recovery: {time.monotonic() - killed:.1f} s")
        # the dead server's stubs (which do not always notice) and their shared memory are gone
        assert not [p for p in stubs if process_alive(p)] and not [p for p in segments if p.exists()]
        assert answers_right()
        stubs, segments = stubs_and_segments(workdir)
        assert json.loads((workdir / "health.json").read_text())["restarts"] == 2
    finally:
        launcher.send_signal(signal.SIGTERM)
        output = launcher.communicate(timeout=60)[0]
    assert launcher.returncode == 0, output
    assert "unhealthy: model instance stub dead: decoder_cpu_1" in output and "recovered in" in output
    assert not process_alive(json.loads((workdir / "health.json").read_text())["pid"])
    assert not [p for p in stubs if process_alive(p)] and not [p for p in segments if p.exists()]  # a clean stop


def stubs_and_segments(workdir):
    """The instances' stub PIDs and the /dev/shm files they map."""
    pids = [json.loads(p.read_text())["pid"] for p in (workdir / "instances").glob("*.json")]
    return pids, shm_files(pids)


def test_without_restarts_the_launcher_stops_when_an_instance_dies(tiny_repo, tmp_path):
    http, grpc, metrics = free_ports(3)
    workdir = tmp_path / "work"
    cmd = [sys.executable, "-m", "vlaserve.server", "--model-repository", str(tiny_repo), "--workdir", str(workdir),
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--health-interval", "0.5", "--no-restart"]  # fmt: skip
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        status = workdir / "instances" / "encoder_cpu_0.json"
        assert wait_for(lambda: status.is_file() and (workdir / "instances" / "decoder_cpu_1.json").is_file(), 150)
        time.sleep(1)
        os.kill(json.loads(status.read_text())["pid"], signal.SIGKILL)
        launcher.wait(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert "[serve] stopped" in launcher.stdout.read()


def test_a_dead_mps_daemon_is_told_from_a_live_one(tmp_path):
    """Its control file is a SOCK_SEQPACKET socket: a live daemon accepts, a dead one leaves it refusing."""
    import socket

    from vlaserve.supervisor import mps_daemon_problem

    assert "does not answer" in mps_daemon_problem(tmp_path)  # no daemon ever
    daemon = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    daemon.bind(str(tmp_path / "control"))
    daemon.listen(1)
    assert mps_daemon_problem(tmp_path) == ""
    daemon.close()  # the file stays, as after kill -9 of the daemon
    assert (tmp_path / "control").exists()
    problem = mps_daemon_problem(tmp_path)
    assert "does not answer" in problem and "refused" in problem.lower(), problem
    assert health.check(tmp_path, "http://127.0.0.1:9", mps_pipe=str(tmp_path)) == problem


def test_stale_python_backend_regions_are_removed_and_live_or_fresh_ones_kept():
    """A tritonserver killed with its launcher leaves its regions in /dev/shm; the next start removes the
    ones nothing maps, and keeps one that is mapped or too new to be mapped yet."""
    import mmap
    import uuid

    from vlaserve.server import PYTHON_SHM_PREFIX, remove_stale_python_shm

    tag = uuid.uuid4().hex
    stale, live, fresh = (
        Path("/dev/shm") / f"{PYTHON_SHM_PREFIX}test-{kind}-{tag}" for kind in ("stale", "live", "fresh")
    )
    for path in (stale, live, fresh):
        path.write_bytes(b"\0" * 4096)
    for path in (stale, live):
        os.utime(path, (time.time() - 600, time.time() - 600))
    try:
        with open(live, "r+b") as fh, mmap.mmap(fh.fileno(), 4096):
            removed = remove_stale_python_shm()
        assert stale in removed and removed[stale] == 4096
        assert not stale.exists() and live.exists() and fresh.exists()
    finally:
        for path in (stale, live, fresh):
            path.unlink(missing_ok=True)
