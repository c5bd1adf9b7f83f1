"""Start a real Triton Inference Server over a model repository, and stop it cleanly.

Embedded (default): the ``tritonserver`` binary (Triton 2.51) and Python backend that the pinned
``nvidia-pytriton`` wheel ships; the wheel has no ONNX Runtime or libtorch backend, so every model here is
a Python-backend model. The backend directory is assembled for the running Python (the backend library
plus the stub built for this Python version), the wheel's libraries go on ``LD_LIBRARY_PATH``, and this
interpreter's ``bin`` goes first on ``PATH``: the stub's embedded Python takes its packages from the
first ``python3`` there (not from ``PYTHONPATH``), and under numpy 2 it silently zeroes every tensor, so
it must find this virtualenv (numpy < 2). In NVIDIA's container, pass ``--tritonserver`` to use the
image's own server and backends instead. ``python -m vlaserve.server --help`` lists the options.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import os
import re
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
from typing import TYPE_CHECKING

from vlaserve import admission, drain
from vlaserve import interface as io
from vlaserve.errors import VlaserveError
from vlaserve.runner import STATUS_DIR_ENV
from vlaserve.supervisor import Supervisor
from vlaserve.value_check import MPS_CHECK_ENV, MPS_CHECK_FILE

if TYPE_CHECKING:
    from collections.abc import Collection

    from vlaserve.spec import Spec

# The Python backend's shared-memory region per stub: the default (1 MB, growing by 1 MB) is grown
# under load many times a second with camera-sized requests, and Triton 2.51 then aborted with
# boost::interprocess::lock_exception (seen here at 16 concurrent users). Start large, grow rarely.
PYTHON_SHM_BYTES = 128 * 2**20
PYTHON_SHM_GROWTH_BYTES = 64 * 2**20
# Endpoints that can change or read the server's state; they need the admin key header.
RESTRICTED = "model-repository,shared-memory,logging,trace"
ADMIN_HEADER = io.ADMIN_HEADER  # over gRPC the metadata key is io.GRPC_ADMIN_HEADER
ADMIN_KEY_FILE = io.ADMIN_KEY_FILE  # <workdir>/admin-key, mode 0600, when the key was generated


def free_ports(count: int, host: str = io.DEFAULT_HOST, taken: Collection[int] = ()) -> list[int]:
    """``count`` distinct free ports, none of them in ``taken`` (all held open while picking, so none is handed
    out twice: a port just picked and closed can come back from the system's next pick)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count + len(taken))]
        for sock in socks:
            sock.bind((host, 0))
        return [port for port in (sock.getsockname()[1] for sock in socks) if port not in taken][:count]


def free_port(host: str = io.DEFAULT_HOST) -> int:
    return free_ports(1, host)[0]


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
    # A copy, not a link: the Python backend gives its stub execute permission at every model load, which
    # fails on a file another user owns (a non-root UID serving from root-owned site-packages, as in a container).
    shutil.copy2(stub, backend / stub.name)
    return backend.parent


def check_stub_libraries(stub: Path, env: dict) -> None:
    """Refuse to start when the stub cannot load: its libpython missing, tritonserver would start, every
    stub would die at once, and it would wait for them until its timeout, with one line in its log."""
    if shutil.which("ldd") is None:
        return
    out = subprocess.run(["ldd", str(stub)], capture_output=True, text=True, env=env).stdout
    missing = sorted({line.split("=>")[0].strip() for line in out.splitlines() if "not found" in line})
    if missing:
        raise VlaserveError(
            "Python-backend stub libraries", ", ".join(missing) + " not found",
            f"the shared library of this Python (e.g. Debian's libpython{sys.version_info.major}.{sys.version_info.minor})",
        )  # fmt: skip


def _option(default, help: str, cli: bool = True):
    """A ServerOptions field: its default, and its help on the launcher's command line (``cli=False``: none)."""
    return dataclasses.field(default=default, metadata={"help": help, "cli": cli})


@dataclasses.dataclass
class ServerOptions:
    """How to start the server. Ports of 0 are picked free at start. Every field is a flag of
    ``python -m vlaserve.server`` (:func:`parse_args` is built from these fields), except the admin key."""

    model_repository: Path = _option(Path("model_repository"), "the model repository `make export` wrote")
    host: str = _option(io.DEFAULT_HOST, "address to listen on (0.0.0.0 for all)")
    http_port: int = _option(io.HTTP_PORT, "HTTP port (0: pick a free one)")
    grpc_port: int = _option(io.GRPC_PORT, "gRPC port (0: pick a free one)")
    metrics_port: int = _option(io.METRICS_PORT, "Prometheus metrics port (0: pick a free one)")
    workdir: Path = _option(Path(io.DEFAULT_WORKDIR), "backend folder, logs, instance status, health and the admin key")
    log_file: Path | None = _option(None, "tritonserver's log (default: <workdir>/tritonserver.log)")
    tritonserver: Path | None = _option(
        None, "this tritonserver binary and its own backends (NVIDIA's container) instead of the embedded one"
    )
    # Not a flag: a key on a command line is readable by every local user. $VLASERVE_ADMIN_KEY, or generated.
    admin_key: str | None = _option(None, "the admin key", cli=False)
    ready_timeout: float = _option(180.0, "seconds to wait for readiness")
    log_verbose: int = _option(0, "tritonserver's --log-verbose level")
    mps: bool = _option(False, "start the MPS sidecar (deploy/mps/entrypoint.sh) natively first (GPU hosts)")
    cuda_memory_pool_mb: int = _option(
        0, "Triton's CUDA memory pool on each GPU, MiB, for tensors between the models (0: Triton's 64 MiB)"
    )
    exit_timeout: int | None = _option(
        None,
        "seconds a stop waits, beyond 10 s, for the requests admitted to be answered (default: the configs' queue "
        "timeouts and 10 s); also tritonserver's own --exit-timeout-secs",
    )
    http_guard: bool = _option(
        True,
        "clients' HTTP through vlaserve.guard, which checks every inference request's shapes against the model's "
        "config first (a lying shape can crash tritonserver 2.51); Triton's own HTTP then listens on loopback",
    )
    extra_args: tuple[str, ...] = _option((), "one more tritonserver argument, as --name=value (repeatable)")


def _drain_seconds(repo: Path) -> int:
    from vlaserve.repository import drain_seconds

    try:
        return drain_seconds(repo)
    except Exception:  # noqa: BLE001 - no or unreadable configs: start() names the problem
        return 30


def shm_files(pids) -> set[Path]:
    """The /dev/shm files these processes map (gone processes are skipped)."""
    found = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
                if path.startswith("/dev/shm/"):
                    found.add(Path(path.removesuffix(" (deleted)")))
    return found


PYTHON_SHM_PREFIX = "triton_python_backend_shm_region_"  # the Python backend's names for its regions


def remove_stale_python_shm(shm_dir: Path = Path("/dev/shm"), min_age_s: float = 10.0) -> dict[Path, int]:
    """Remove the Python backend's regions that no process here maps and that are older than ``min_age_s``
    (a region being created is not yet mapped); {path: bytes} of those removed.

    They are what a tritonserver killed together with its launcher leaves: nobody was left to clean up.
    In the GPU compose form the server uses the MPS sidecar's /dev/shm, which outlives a restart of the
    server's container, so each crash would keep 128 MiB or more per stub until the stubs run out of room.
    Only regions this user may delete are candidates, and only processes this launcher can see count as
    users: two servers in different PID namespaces must not share one /dev/shm."""
    now, candidates = time.time(), {}
    for path in shm_dir.glob(PYTHON_SHM_PREFIX + "*"):
        with contextlib.suppress(OSError):
            stat = path.stat()
            if now - stat.st_mtime > min_age_s and stat.st_uid == os.geteuid():
                candidates[path] = stat.st_size
    if not candidates:
        return {}
    mapped = shm_files(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    removed = {}
    for path, size in candidates.items():
        if path not in mapped:
            with contextlib.suppress(OSError):
                path.unlink()
                removed[path] = size
    return removed


def group_members(pgid: int) -> list[int]:
    """The live processes of a process group (tritonserver's stubs stay in its group)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(stat.parent.name))
    return members


class TritonServer:
    """A tritonserver process: ``with TritonServer(opts) as server: ...`` starts it and waits for readiness."""

    def __init__(self, options: ServerOptions):
        self.options = opts = dataclasses.replace(options)
        fields = ("http_port", "grpc_port", "metrics_port")
        unset = [f for f in fields if getattr(opts, f) == 0]
        for field, port in zip(unset, free_ports(len(unset), opts.host, taken={getattr(opts, f) for f in fields})):
            setattr(opts, field, port)
        opts.workdir = Path(opts.workdir).resolve()
        opts.log_file = Path(opts.log_file or opts.workdir / "tritonserver.log").resolve()
        self.generated_key = not (opts.admin_key or os.environ.get(io.ADMIN_KEY_ENV))
        opts.admin_key = opts.admin_key or os.environ.get(io.ADMIN_KEY_ENV) or secrets.token_hex(16)
        self.admin_key_file = opts.workdir / ADMIN_KEY_FILE if self.generated_key else None
        self.status_dir = opts.workdir / "instances"
        # how long a stop waits for the requests admitted (sized from the queue timeouts)
        self.exit_timeout = opts.exit_timeout or _drain_seconds(opts.model_repository)
        # Triton's own HTTP: behind the guard on a loopback port, else where clients connect
        # (none of the three: else tritonserver refuses to start, HTTP and gRPC on one port)
        ports = {opts.http_port, opts.grpc_port, opts.metrics_port}
        self.triton_http = f"{io.DEFAULT_HOST}:{free_ports(1, taken=ports)[0]}" if opts.http_guard else self.http_url
        self.process: subprocess.Popen | None = None
        self.segments: list[Path] = []
        self.cleaned = False  # stop() has ended the process group and removed its shared memory
        self.stop_reason = ""  # how the last stop() saw tritonserver drained, or "timeout"
        self.guard: subprocess.Popen | None = None
        self.sidecar: MpsSidecar | None = None

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
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the stub's Python: numpy < 2
        env[STATUS_DIR_ENV] = str(self.status_dir)
        env.setdefault(MPS_CHECK_ENV, str(opts.workdir / MPS_CHECK_FILE))  # what `make mps-check` found safe
        if self.sidecar is not None:
            env.update(self.sidecar.client_env())
        if opts.tritonserver:
            binary, backend_args = Path(opts.tritonserver), []
        else:
            binary, root, libs = embedded_tritonserver()
            env["LD_LIBRARY_PATH"] = f"{libs}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}"
            backend_args = [f"--backend-directory={assemble_backends(root, opts.workdir)}"]
            check_stub_libraries(opts.workdir / "backends" / "python" / "triton_python_backend_stub", env)
        restricted = f"{RESTRICTED}:{ADMIN_HEADER}={opts.admin_key}"
        cmd = [
            str(binary),
            f"--model-repository={Path(opts.model_repository).resolve()}",
            *backend_args,
            "--model-control-mode=none",
            f"--http-address={self.triton_http.rpartition(':')[0]}",
            f"--http-port={self.triton_http.rpartition(':')[2]}",
            f"--grpc-address={opts.host}",
            f"--grpc-port={opts.grpc_port}",
            f"--metrics-address={opts.host}",
            f"--metrics-port={opts.metrics_port}",
            f"--http-restricted-api={restricted}",
            f"--grpc-restricted-protocol={restricted}",
            f"--backend-config=python,shm-default-byte-size={PYTHON_SHM_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={PYTHON_SHM_GROWTH_BYTES}",
            *(
                [
                    f"--cuda-memory-pool-byte-size={gpu}:{opts.cuda_memory_pool_mb * 2**20}"
                    for gpu in range(_host_gpu_count())
                ]
                if opts.cuda_memory_pool_mb
                else []
            ),
            f"--exit-timeout-secs={self.exit_timeout}",
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
        if self.admin_key_file is not None:  # shown to its owner only: a file of mode 0600
            self.admin_key_file.unlink(missing_ok=True)
            fd = os.open(self.admin_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(self.options.admin_key + "\n")
        try:
            if self.options.mps:
                self.sidecar = MpsSidecar(self.options.workdir)
                self.sidecar.start()
            cmd, env = self.command_and_env()
            stale = remove_stale_python_shm()
            if stale:
                print(f"[serve] removed {len(stale)} Python-backend shared-memory regions nothing maps "
                      f"({sum(stale.values()) / 2**20:.0f} MiB; left by a tritonserver killed with its launcher)", flush=True)  # fmt: skip
            self.options.log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.options.log_file, "wb") as log:
                self.process = subprocess.Popen(
                    cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            self.cleaned = False
            self.wait_ready(self.triton_http)
            self.segments = self._shm_segments()  # removed by stop() if a crash leaves them behind
            # after the warm-up requests, which run each model on its own (vlaserve.admission)
            admission.create(self.status_dir / admission.ADMISSION_FILE)
            if self.options.http_guard:
                guard_cmd = [
                    sys.executable,
                    "-m",
                    "vlaserve.guard",
                    "--listen",
                    self.http_url,
                    "--upstream",
                    self.triton_http,
                    "--drain-seconds",
                    str(self.exit_timeout),
                ]
                with open(self.options.workdir / "guard.log", "wb") as log:
                    self.guard = subprocess.Popen(
                        guard_cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                self.wait_ready(self.http_url)
        except BaseException:
            self.stop()  # the MPS sidecar too: nothing is left running after a failed start
            raise
        return self

    def mps_pipe(self) -> str | None:
        """The MPS pipe directory the instances use: the sidecar's, or one given in the environment."""
        if self.sidecar is not None:
            return str(self.sidecar.pipe_dir)
        return os.environ.get("CUDA_MPS_PIPE_DIRECTORY")

    def wait_ready(self, address: str) -> None:
        deadline = time.monotonic() + self.options.ready_timeout
        url = f"http://{address}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.guard is not None and self.guard.poll() is not None:
                log = (self.options.workdir / "guard.log").read_text(errors="replace").strip().splitlines()
                raise RuntimeError(f"the HTTP guard exited with code {self.guard.returncode}: {log[-1:] or ''}")
            if self.process.poll() is not None:
                refused = "".join(f"{line}\n" for line in self.refusals())
                raise RuntimeError(
                    f"{refused}tritonserver exited with code {self.process.returncode}:\n{self.log_tail()}"
                )
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"tritonserver not ready after {self.options.ready_timeout:.0f} s:\n{self.log_tail()}")

    def refusals(self) -> list[str]:
        """The value-check lines of instances that refused to load (vlaserve.value_check), each once."""
        try:
            text = self.options.log_file.read_text(errors="replace")
        except OSError:
            return []
        marker = "vlaserve value check failed:"
        found = (
            line[line.index(marker) :].split(" (value_check:")[0].rstrip('" ')
            for line in text.splitlines()
            if marker in line
        )
        return list(dict.fromkeys(found))

    def log_tail(self, lines: int = 12) -> str:
        """tritonserver's error lines (why models failed to load), then the last ``lines`` of its log: the
        tail alone is often its options table."""
        try:
            text = self.options.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        errors = [line for line in text[:-lines] if re.match(r"E\d{4} ", line)][-10:]
        return "\n".join([*errors, *(["..."] if errors else []), *text[-lines:]])

    def stop(self, timeout: float | None = None, admitted: bool = True) -> int | None:
        """Stop what was started; 0 when every request admitted was answered first.

        The HTTP guard goes first (no new HTTP requests; those in flight are answered). Then the launcher
        closes the door (vlaserve.drain): the instances answer new requests UNAVAILABLE, retryable, while
        the requests already admitted finish. Once no instance runs a batch and no in-flight slot is taken,
        it ends tritonserver's process group, and removes the shared-memory segments the stubs held.
        tritonserver never gets SIGTERM: on it, it would unload the models as soon as it found nothing in
        flight, answering NOT_FOUND (a permanent error) to every request meanwhile. Past ``timeout``
        (default: the exit timeout and 10 s) without draining, the group is killed as well, and the exit
        code says so. ``admitted=False`` waits only for the batches running: for a restart after an instance
        died, whose admitted requests hold their slots until they expire (0 then says only that the batches
        running were answered).
        """
        timeout = self.exit_timeout + 10 if timeout is None else timeout
        if self.guard is not None:  # first: no new HTTP requests, and those in flight answered, while Triton runs
            if self.guard.poll() is None:
                self.guard.terminate()
                try:
                    self.guard.wait(self.exit_timeout + 5)
                except subprocess.TimeoutExpired:
                    self.guard.kill()
                    self.guard.wait()
            self.guard = None
        code = None if self.process is None else self.process.poll()
        if self.process is not None and not self.cleaned:
            segments = {*self.segments, *self._shm_segments()}
            if code is None:
                drained = ""
                try:
                    drain.close(self.status_dir)
                    drained = self._wait_drained(timeout, admitted)
                finally:  # also when interrupted: a tritonserver with its door closed would refuse everything
                    code = self.process.poll()
                    self.stop_reason = drained or (
                        "tritonserver exited" if code is not None else f"{timeout:g} s passed"
                    )
                    if code is None:
                        os.killpg(self.process.pid, signal.SIGKILL)
                        self.process.wait()
                        code = 0 if drained else -signal.SIGKILL
            # Stubs left behind by a tritonserver that died (a crash, a kill) do not always notice: they
            # would keep their memory, and their shared-memory regions, which a full unload unlinks.
            deadline = time.monotonic() + 5
            while group_members(self.process.pid) and time.monotonic() < deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                time.sleep(0.05)
            for path in segments:
                with contextlib.suppress(OSError):
                    path.unlink()
            self.cleaned = True  # once: the group's ID may later be another process's
        if self.sidecar is not None:  # after the server: its clients are gone by now
            self.sidecar.stop()
            self.sidecar = None
        return code

    def _wait_drained(self, timeout: float, admitted: bool = True) -> str:
        """After closing the door: wait until no instance of tritonserver's group runs a batch and
        (``admitted``) no in-flight slot is taken and no request waits in the decoder's queue, for
        drain.QUIET_S on end (the last answers leave meanwhile); how that was seen, or "" (tritonserver
        exited, or ``timeout`` passed)."""
        started = time.monotonic()
        deadline, quiet_since, slots_alone_since, lost = started + timeout, None, None, 0
        waited = collections.Counter()
        slots = self.status_dir / admission.ADMISSION_FILE
        members = set(group_members(self.process.pid))  # the instances' processes (read once: /proc is slow)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return ""
            now = time.monotonic()
            running = drain.busy(self.status_dir, members)
            queued = admitted and not running and self._decoder_waiting()
            taken = admission.taken(slots) if admitted and not running and not queued else 0
            if taken and queued is False:
                # Slots taken while nothing runs and the decoder's queue is empty: a request between the
                # models, for milliseconds; or slots whose request went away (cancelled between the models),
                # which come back only when they expire. After drain.SLOTS_ALONE_S they count as the latter.
                slots_alone_since = slots_alone_since or now
                if now - slots_alone_since >= drain.SLOTS_ALONE_S:
                    lost, taken = taken, 0
            else:
                slots_alone_since = None
            if running or queued or taken:
                quiet_since = None
                waited["a batch running" if running else "the decoder's queue" if queued else "in-flight slots"] += 1
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= drain.QUIET_S:
                took = now - started
                why = f" after {took:.1f} s, mostly waiting for {waited.most_common(1)[0][0]}" if took > 2 else ""
                gone = f"; {lost} in-flight slots had no request behind them" if lost else ""
                return "drained (no batch running" + (", no request admitted" if admitted else "") + ")" + why + gone
            time.sleep(0.005)
        return ""

    def _decoder_waiting(self) -> bool | None:
        """Whether a request waits in the decoder's queue (Triton's pending gauge; None if unreadable)."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=0.2) as resp:
                text = resp.read().decode()
        except (OSError, ValueError):
            return None
        prefix = f'nv_inference_pending_request_count{{model="{io.DECODER}"'
        return any(float(line.rsplit(" ", 1)[1]) > 0 for line in text.splitlines() if line.startswith(prefix))

    def _shm_segments(self) -> list[Path]:
        """The /dev/shm files mapped by tritonserver's process group (the Python backend's regions)."""
        return sorted(shm_files(group_members(self.process.pid)))

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class MpsSidecar:
    """The MPS sidecar's entrypoint (deploy/mps/entrypoint.sh) run natively, for ``--mps`` on a GPU host."""

    ENTRYPOINT = Path(__file__).resolve().parents[1] / "deploy" / "mps" / "entrypoint.sh"

    def __init__(self, workdir: Path):
        self.pipe_dir = workdir / "mps-pipe"
        self.log_dir = workdir / "mps-log"
        self.process: subprocess.Popen | None = None
        self.sm_counts: list[int] = []

    def client_env(self) -> dict[str, str]:
        env = {"CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir), "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir)}
        if self.sm_counts:  # lets each instance check the SMs it got, on its own GPU
            env["VLASERVE_GPU_SMS"] = ",".join(map(str, self.sm_counts))
        return env

    def start(self, timeout: float = 30.0) -> MpsSidecar:
        self.sm_counts = gpu_sm_counts()  # before the daemon: the whole GPUs
        env = {**os.environ, **self.client_env()}
        self.process = subprocess.Popen(
            ["bash", str(self.ENTRYPOINT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        for line in self.process.stdout:
            print(f"[serve] {line.rstrip()}", flush=True)
            if line.startswith("mps: ready"):
                return self
            if line.startswith("mps: error") or time.monotonic() > deadline:
                break
        code = self.process.wait(5)
        raise RuntimeError(f"the MPS sidecar did not start (exit code {code}); see the line above")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)


def _host_gpu_count() -> int:
    from vlaserve.repository import host_gpu_count

    return host_gpu_count()


def gpu_sm_counts() -> list[int]:
    """The SM count of every visible GPU, in CUDA's order ([] without one), read in a short-lived process so
    that this one keeps no CUDA context."""
    probe = (
        "import torch; n = torch.cuda.device_count() if torch.cuda.is_available() else 0; "
        "print(','.join(str(torch.cuda.get_device_properties(i).multi_processor_count) for i in range(n)))"
    )
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return []
    counts = out.splitlines()[-1].split(",") if out else []
    return [int(c) for c in counts if c.isdigit()]


def _flag_type(annotation: str):
    for name, kind in (("Path", Path), ("float", float), ("int", int)):
        if name in annotation:
            return kind
    return str


def parse_args(argv=None) -> argparse.Namespace:
    """The launcher's command line: a flag per ServerOptions field, then the supervisor's own."""
    parser = argparse.ArgumentParser(
        prog="python -m vlaserve.server",
        allow_abbrev=False,  # a shipped command line must name each flag in full (tests/test_deploy.py)
        description="Start Triton Inference Server over a model repository, supervised; stop it with Ctrl-C or "
        "SIGTERM. The admin key comes from $VLASERVE_ADMIN_KEY, or is generated into <workdir>/admin-key.",
    )
    for field in dataclasses.fields(ServerOptions):
        if not field.metadata["cli"]:
            continue
        flag, text = "--" + field.name.replace("_", "-"), field.metadata["help"]
        if field.name == "extra_args":
            parser.add_argument("--triton-arg", dest=field.name, metavar="ARG", action="append", default=[], help=text)
        elif field.type == "bool" and field.default:
            parser.add_argument(f"--no-{flag[2:]}", dest=field.name, action="store_false", help=f"turn off: {text}")
        elif field.type == "bool":
            parser.add_argument(flag, dest=field.name, action="store_true", help=text)
        else:
            shown = "" if field.default is None else f" (default: {field.default})"
            parser.add_argument(
                flag, dest=field.name, type=_flag_type(field.type), default=field.default, help=text + shown
            )
    parser.add_argument(
        "--health-interval", type=float, default=2.0,
        help="seconds between the supervisor's checks of the server and its instance processes (default: 2)",
    )  # fmt: skip
    parser.add_argument(
        "--no-restart", action="store_true", help="stop instead of restarting a server that died or lost an instance"
    )
    return parser.parse_args(argv)


def server_options(args: argparse.Namespace) -> ServerOptions:
    """Every parsed ServerOptions flag, passed through."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerOptions) if f.metadata["cli"]}
    values["extra_args"] = tuple(values["extra_args"])
    return ServerOptions(**values)


def variant_server(spec: Spec, artifacts_from: Path, repo_dir: Path, workdir: Path, **options) -> TritonServer:
    """A server (not started) over ``spec`` with the artifacts exported in ``artifacts_from``: the spec's
    repository is written to ``repo_dir``, the server works in ``workdir`` on free ports, under MPS when the
    spec sets any percentage. ``options`` are further ServerOptions fields. The one way the sweep's compare
    (and so make demo's) and the GPU benchmarks serve a variant."""
    from vlaserve import repository
    from vlaserve.manifest import read_manifest_settings

    settings = read_manifest_settings(Path(artifacts_from))
    if settings is None:
        raise VlaserveError("model repository", str(artifacts_from), "one with exported artifacts (make export)")
    repo = repository.write_repository(spec, Path(repo_dir), settings, artifacts_from=Path(artifacts_from))
    fields = {"http_port": 0, "grpc_port": 0, "metrics_port": 0, "mps": spec.uses_mps, **options}
    return TritonServer(ServerOptions(model_repository=repo, workdir=Path(workdir), **fields))


def main(argv=None) -> int:
    args = parse_args(argv)
    options = server_options(args)
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
    except KeyboardInterrupt:  # start() has stopped what it started
        print("[serve] interrupted while starting; stopped", flush=True)
        return 130
    print(f"[serve] ready: grpc {server.grpc_url}  http {server.http_url}  metrics {server.metrics_url}", flush=True)
    if server.admin_key_file is not None:
        print(
            f"[serve] admin key (header {ADMIN_HEADER}) generated for this start, in {server.admin_key_file}",
            flush=True,
        )
    print("[serve] Ctrl-C or SIGTERM stops it; `python -m vlaserve.health` tells whether it is healthy", flush=True)
    try:
        if args.no_restart:
            watcher = Supervisor(server)
            while not stopping and not watcher.problem():
                time.sleep(args.health_interval)
        else:
            Supervisor(server, interval=args.health_interval, log=lambda m: print(m, flush=True)).run(
                lambda: bool(stopping)
            )
    except KeyboardInterrupt:
        pass
    code = server.stop()
    how = f", {server.stop_reason}" if server.stop_reason else ""
    print(f"[serve] stopped (exit code {code}{how})", flush=True)
    return 0 if code in (0, None) else code


if __name__ == "__main__":
    sys.exit(main())
