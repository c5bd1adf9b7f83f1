"""Start a real Triton Inference Server over a model repository, and stop it cleanly.

Embedded (default): the ``tritonserver`` binary and Python backend from the pinned ``nvidia-pytriton``
wheel (DESIGN.md facts 5 and 7). The backend directory is assembled for the running Python (the
backend library plus the stub built for this Python version), the wheel's libraries go on
``LD_LIBRARY_PATH``, and this interpreter's ``bin`` goes first on ``PATH`` so that the stub's embedded
Python uses this virtualenv (numpy < 2). In NVIDIA's container, pass ``--tritonserver`` to use the
image's own server and backends instead. ``python -m vlaserve.server --help`` lists the options.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from vlaserve import interface as io
from vlaserve.errors import VlaserveError
from vlaserve.runner import STATUS_DIR_ENV

# Endpoints that can change or read the server's state; they need the admin key header.
RESTRICTED = "model-repository,shared-memory,logging,trace"
ADMIN_HEADER = "vlaserve-admin-key"


def free_port(host: str = io.DEFAULT_HOST) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def embedded_tritonserver() -> tuple[Path, Path, Path]:
    """(tritonserver binary, python backend folder, libraries folder) from the nvidia-pytriton wheel."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise VlaserveError(
            "tritonserver", "nvidia-pytriton not installed", "`make venv` (or pip install nvidia-pytriton)"
        )
    root = Path(spec.submodule_search_locations[0]) / "tritonserver"
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return root / "bin" / "tritonserver", root, libs


def assemble_backends(triton_root: Path, workdir: Path) -> Path:
    """A backend directory with the Python backend and the stub for this interpreter's version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = triton_root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise VlaserveError("python version", version, f"one with a stub in {stub.parent.parent}")
    backend = workdir / "backends" / "python"
    if backend.exists():
        shutil.rmtree(backend)
    backend.mkdir(parents=True)
    for item in (triton_root / "backends" / "python").iterdir():
        if item.is_file():
            (backend / item.name).symlink_to(item)
    (backend / stub.name).symlink_to(stub)
    return backend.parent


@dataclasses.dataclass
class ServerOptions:
    """How to start the server. Ports of 0 are picked free at start."""

    model_repository: Path = Path("model_repository")
    host: str = io.DEFAULT_HOST
    http_port: int = io.HTTP_PORT
    grpc_port: int = io.GRPC_PORT
    metrics_port: int = io.METRICS_PORT
    workdir: Path = Path(".vlaserve")
    log_file: Path | None = None  # default: <workdir>/tritonserver.log
    tritonserver: Path | None = None  # default: the embedded one
    admin_key: str | None = None  # default: $VLASERVE_ADMIN_KEY or a random one
    ready_timeout: float = 180.0
    log_verbose: int = 0
    extra_args: tuple[str, ...] = ()


class TritonServer:
    """A tritonserver process: ``with TritonServer(opts) as server: ...`` starts it and waits for readiness."""

    def __init__(self, options: ServerOptions):
        self.options = opts = dataclasses.replace(options)
        for field in ("http_port", "grpc_port", "metrics_port"):
            if getattr(opts, field) == 0:
                setattr(opts, field, free_port(opts.host))
        opts.workdir = Path(opts.workdir).resolve()
        opts.log_file = Path(opts.log_file or opts.workdir / "tritonserver.log").resolve()
        opts.admin_key = opts.admin_key or os.environ.get("VLASERVE_ADMIN_KEY") or secrets.token_hex(16)
        self.status_dir = opts.workdir / "instances"
        self.process: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.options.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.options.host}:{self.options.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.options.host}:{self.options.metrics_port}/metrics"

    def command_and_env(self) -> tuple[list[str], dict[str, str]]:
        opts = self.options
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the stub's Python (fact 7)
        env[STATUS_DIR_ENV] = str(self.status_dir)
        if opts.tritonserver:
            binary, backend_args = Path(opts.tritonserver), []
        else:
            binary, root, libs = embedded_tritonserver()
            env["LD_LIBRARY_PATH"] = f"{libs}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}"
            backend_args = [f"--backend-directory={assemble_backends(root, opts.workdir)}"]
        restricted = f"{RESTRICTED}:{ADMIN_HEADER}={opts.admin_key}"
        cmd = [
            str(binary),
            f"--model-repository={Path(opts.model_repository).resolve()}",
            *backend_args,
            "--model-control-mode=none",
            f"--http-address={opts.host}",
            f"--http-port={opts.http_port}",
            f"--grpc-address={opts.host}",
            f"--grpc-port={opts.grpc_port}",
            f"--metrics-address={opts.host}",
            f"--metrics-port={opts.metrics_port}",
            f"--http-restricted-api={restricted}",
            f"--grpc-restricted-protocol={restricted}",
            "--exit-timeout-secs=10",
            f"--log-verbose={opts.log_verbose}",
            *opts.extra_args,
        ]
        return cmd, env

    def start(self) -> TritonServer:
        repo = Path(self.options.model_repository)
        if not (repo / io.POLICY / "config.pbtxt").is_file():
            raise VlaserveError(
                "model repository", str(repo), "a repository with policy/config.pbtxt (run `make export`)"
            )
        self.options.workdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.status_dir, ignore_errors=True)
        cmd, env = self.command_and_env()
        self.options.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.options.log_file, "wb") as log:
            self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.options.ready_timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {self.options.ready_timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.options.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (Triton drains in-flight requests), then SIGKILL of the process group after ``timeout``."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vlaserve.server",
        description="Start Triton Inference Server over a model repository; stop it with Ctrl-C or SIGTERM.",
    )
    parser.add_argument("--model-repository", default="model_repository", help="default: model_repository")
    parser.add_argument(
        "--host", default=io.DEFAULT_HOST, help=f"address to listen on (default: {io.DEFAULT_HOST}; 0.0.0.0 for all)"
    )
    parser.add_argument(
        "--http-port", type=int, default=io.HTTP_PORT, help=f"default: {io.HTTP_PORT}; 0 = pick a free one"
    )
    parser.add_argument(
        "--grpc-port", type=int, default=io.GRPC_PORT, help=f"default: {io.GRPC_PORT}; 0 = pick a free one"
    )
    parser.add_argument("--metrics-port", type=int, default=io.METRICS_PORT, help=f"default: {io.METRICS_PORT}")
    parser.add_argument(
        "--workdir", default=".vlaserve", help="backend folder, logs and instance status (default: .vlaserve)"
    )
    parser.add_argument("--log-file", help="server log (default: <workdir>/tritonserver.log)")
    parser.add_argument("--tritonserver", help="use this tritonserver binary and its own backends (NVIDIA's container)")
    parser.add_argument(
        "--ready-timeout", type=float, default=180.0, help="seconds to wait for readiness (default: 180)"
    )
    parser.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    options = ServerOptions(
        model_repository=Path(args.model_repository),
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        workdir=Path(args.workdir),
        log_file=Path(args.log_file) if args.log_file else None,
        tritonserver=Path(args.tritonserver) if args.tritonserver else None,
        ready_timeout=args.ready_timeout,
        log_verbose=args.log_verbose,
    )
    server = TritonServer(options)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    print(
        f"[serve] starting tritonserver over {args.model_repository} (log: {server.options.log_file}) ...", flush=True
    )
    try:
        server.start()
    except (VlaserveError, RuntimeError, TimeoutError) as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 1
    print(f"[serve] ready: grpc {server.grpc_url}  http {server.http_url}  metrics {server.metrics_url}", flush=True)
    print("[serve] Ctrl-C or SIGTERM stops it", flush=True)
    try:
        while not stopping and server.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    code = server.stop()
    print(f"[serve] stopped (exit code {code})", flush=True)
    return 0 if code in (0, None) else code


if __name__ == "__main__":
    sys.exit(main())
