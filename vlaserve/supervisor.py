"""Keep a tritonserver serving: restart it when it dies or when one of its model instances has died.

Triton 2.51 does not bring back a Python-backend stub that died (killed, out of memory, a crash in a
kernel): the stub stays a zombie, the requests routed to it fail, and ``/v2/health/ready`` still says
200. So readiness alone is not health. The supervisor checks, every ``interval`` seconds, that the
tritonserver process is alive, that every instance's stub process (its PID from
``<workdir>/instances/<instance>.json``) is alive and not a zombie, and, when the server runs under MPS,
that the MPS control daemon still answers. When one is not, it logs why,
restarts the whole server (stop, then start: the MPS sidecar too), with a backoff between failed
attempts, and writes what it saw to ``<workdir>/health.json``, which ``python -m vlaserve.health``
(the container health check) reads.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path

from vlaserve.files import write_whole

HEALTH_FILE = "health.json"


def process_alive(pid: int) -> bool:
    """True for a running process; False for a gone one or a zombie (dead, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)  # no /proc here: existence is all that can be told
        except OSError:
            return False
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def mps_daemon_problem(pipe_dir: str | Path) -> str:
    """ "" when the MPS control daemon answers on ``pipe_dir``; else why not. Its ``control`` file is a
    SOCK_SEQPACKET socket: a live daemon accepts a connection, and a dead one leaves the file behind,
    refusing (measured on the H200 with kill -9 of the daemon)."""
    import socket

    control = Path(pipe_dir) / "control"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.settimeout(2)
        probe.connect(str(control))
    except OSError as exc:
        return f"the MPS control daemon does not answer at {control} ({exc.strerror or exc})"
    finally:
        probe.close()
    return ""


def dead_instances(status_dir: Path) -> list[str]:
    """The instances whose stub process is gone or a zombie, as 'name (pid N)'."""
    dead = []
    for path in sorted(Path(status_dir).glob("*.json")):
        try:
            row = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not process_alive(int(row.get("pid", 0))):
            dead.append(f"{row.get('instance', path.stem)} (pid {row.get('pid')})")
    return dead


class Supervisor:
    """Watches a started :class:`vlaserve.server.TritonServer` and restarts it when it is unhealthy."""

    def __init__(self, server, interval: float = 2.0, max_backoff: float = 30.0, log=print):
        self.server, self.interval, self.max_backoff, self.log = server, interval, max_backoff, log
        self.health_path = Path(server.options.workdir) / HEALTH_FILE
        self.restarts = 0
        self.backoff = 1.0

    def problem(self) -> str:
        """Why the server is not healthy now, or "" when it is."""
        process = self.server.process
        if process is None or process.poll() is not None:
            code = None if process is None else process.returncode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            return f"tritonserver exited ({how})"
        guard = getattr(self.server, "guard", None)
        if guard is not None and guard.poll() is not None:
            return f"the HTTP guard exited (exit code {guard.returncode})"
        dead = dead_instances(self.server.status_dir)
        if dead:
            return f"model instance stub dead: {', '.join(dead)}"
        # Under MPS, the instances' CUDA contexts die with the daemon while every process stays alive.
        pipe = self.server.mps_pipe() if hasattr(self.server, "mps_pipe") else None
        return mps_daemon_problem(pipe) if pipe else ""

    def write_health(self, problem: str, recovering: bool = False) -> None:
        state = {
            "healthy": not problem,
            "problem": problem,
            "recovering": recovering,
            "restarts": self.restarts,
            "checked": datetime.datetime.now().isoformat(timespec="seconds"),
            "interval_s": self.interval,
            "pid": getattr(self.server.process, "pid", None),
        }
        write_whole(self.health_path, json.dumps(state) + "\n")

    def recover(self, problem: str) -> None:
        """Restart the server; on a failed start, wait (doubling up to max_backoff) and try again."""
        started = time.monotonic()
        while True:
            self.write_health(problem, recovering=True)
            self.log(f"[serve] unhealthy: {problem}; restarting tritonserver (restart {self.restarts + 1})")
            # Only the batches running: an instance that died keeps its requests' in-flight slots taken.
            self.server.stop(admitted=False)
            try:
                self.server.start()
            except Exception as exc:  # noqa: BLE001 - every failed start is logged, then retried after a pause
                problem = f"restart failed: {str(exc).splitlines()[0]}"
                self.log(f"[serve] {problem}; next attempt in {self.backoff:.0f} s")
                time.sleep(self.backoff)
                self.backoff = min(self.backoff * 2, self.max_backoff)
                continue
            self.restarts += 1
            self.backoff = 1.0
            self.log(f"[serve] recovered in {time.monotonic() - started:.1f} s (restart {self.restarts})")
            self.write_health("")
            return

    def run(self, stopping) -> None:
        """Check until ``stopping()`` is true."""
        self.write_health("")
        while not stopping():
            problem = self.problem()
            if problem:
                self.recover(problem)
            else:
                self.write_health("")
            deadline = time.monotonic() + self.interval
            while time.monotonic() < deadline and not stopping():
                time.sleep(0.1)
