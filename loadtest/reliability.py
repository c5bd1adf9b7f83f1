"""``make reliability``: the served policy tried as a hostile or unlucky user would, against real servers.

    python -m loadtest.reliability [--quick] [--repository model_repository] [--out reports/reliability-...]

One launcher (``python -m vlaserve.server``, with its HTTP guard and supervisor) over the exported
repository, then, in order:

1. crash requests: the 128-byte HTTP request that made tritonserver 2.51 abort, its family of lying
   shapes and binary sizes, to every model over HTTP and gRPC;
2. malformed bodies: ordinary bad HTTP bodies and bad tensors over both protocols;
3. fuzz: schemathesis generates requests from the v2 protocol's HTTP schema (loadtest/v2_openapi.yaml)
   and checks that none is answered with a server error;
4. keys: the admin endpoints without, with a wrong, and with the right key;
5. overload: Locust, 128 closed-loop users: how much of the encoder's work is thrown away;
6. soak: steady load with the server's memory sampled;
7. stub kill: a decoder instance's process killed under load: how long until health is true again
   and answers are right;
8. SIGTERM under load: exit code, time, what the clients got, and what was left behind.

After each of 1 to 7, the same tritonserver process (or, after 7, its replacement) must answer the
reference request exactly as before. "lost" counts valid requests that got neither a right answer
nor a retryable error (UNAVAILABLE, HTTP 503, a refused connection), and wrong answers. Prints one
table, writes ``results.json`` and ``table.md``; exits 1 if any row fails.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np

from loadtest import hostile, sweep
from vlaserve import health
from vlaserve import interface as io
from vlaserve.client import PolicyClient, error_line, make_request
from vlaserve.manifest import manifest_path, read_manifest
from vlaserve.model.parity import REL_TOLERANCE
from vlaserve.server import free_ports, group_members, shm_files
from vlaserve.supervisor import process_alive

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(__file__).with_name("v2_openapi.yaml")
CHECKS = ("crash", "malformed", "fuzz", "keys", "overload", "soak", "stub-kill", "sigterm")
RETRYABLE = ("StatusCode.UNAVAILABLE", "[503]", "Connection refused", "connection closed", "Connection reset")


class Reference(NamedTuple):
    """The request every check sends, its first answer, and how close later answers must be to it."""

    request: dict
    actions: np.ndarray
    tolerance: float


def rel_error(actions: np.ndarray, expected: np.ndarray) -> float:
    """Relative L2 error; infinite for a wrong shape or a non-finite value."""
    if actions.shape != expected.shape or not np.isfinite(actions).all():
        return float("inf")
    return float(np.linalg.norm(actions - expected) / max(np.linalg.norm(expected), 1e-12))


def right(actions: np.ndarray, expected: np.ndarray, tolerance: float) -> bool:
    """Within the export's parity tolerance for its dtype (relative L2 error): bf16 answers differ a little
    with the batch they were computed in."""
    return rel_error(actions, expected) <= tolerance


def classify(exc: Exception) -> str:
    """'retryable' for what a client should retry (the server is busy, stopping or restarting)."""
    line = error_line(exc)
    return "retryable" if any(r.lower() in line.lower() for r in RETRYABLE) else "permanent"


class Launcher:
    """``python -m vlaserve.server`` as a user starts it, on free ports, with its own workdir."""

    def __init__(self, repository: Path, workdir: Path):
        self.repository, self.workdir = repository, workdir
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.http, self.grpc = f"127.0.0.1:{self.http_port}", f"127.0.0.1:{self.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300.0) -> None:
        cmd = [sys.executable, "-m", "vlaserve.server", "--model-repository", str(self.repository),
               "--workdir", str(self.workdir), "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--metrics-port", str(self.metrics_port), "--health-interval", "0.5"]  # fmt: skip
        self.log = open(self.workdir.parent / "launcher.log", "w")  # noqa: SIM115 - open for the launcher's life
        self.process = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while self.health() and time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the launcher exited ({self.process.returncode}); see {self.log.name}")
            time.sleep(0.5)
        if self.health():
            raise RuntimeError(f"not healthy after {timeout:.0f} s: {self.health()}")

    def health(self) -> str:
        return health.check(self.workdir, f"http://{self.http}")

    def server_pid(self) -> int:
        return json.loads((self.workdir / "health.json").read_text())["pid"]

    def instances(self) -> dict[str, int]:
        rows = (json.loads(p.read_text()) for p in (self.workdir / "instances").glob("*.json"))
        return {r["instance"]: r["pid"] for r in rows}

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.process is not None:
            self.log.close()


class Load:
    """Closed-loop clients in threads; every answer is compared with the reference answer."""

    def __init__(self, targets: list[tuple[str, str]], ref: Reference):
        self.targets, self.ref = targets, ref
        self.outcomes: list[tuple[float, str, str]] = []  # (time, outcome, message)
        self.latencies: list[tuple[float, float]] = []  # (time, seconds) of every right answer
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=t, daemon=True) for t in targets]

    def _run(self, protocol: str, url: str) -> None:
        client = PolicyClient(url, protocol, timeout_s=60)
        while not self._stop.is_set():
            started = time.time()
            try:
                err = rel_error(client.infer(self.ref.request), self.ref.actions)
                good = err <= self.ref.tolerance
                if good:
                    self.latencies.append((started, time.time() - started))
                self.outcomes.append((started, "ok" if good else "wrong", "" if good else f"rel error {err:.3g}"))
            except Exception as exc:  # noqa: BLE001 - each failure is classified, not raised
                self.outcomes.append((started, classify(exc), error_line(exc)[:160]))
                time.sleep(0.05)  # a client backs off a little before it retries

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)

    def counts(self, since: float = 0.0) -> collections.Counter:
        return collections.Counter(o for t, o, _ in list(self.outcomes) if t >= since)

    def messages(self, outcome: str, since: float = 0.0) -> list[str]:
        return sorted({m for t, o, m in list(self.outcomes) if o == outcome and t >= since})


def describe(load: Load, since: float) -> str:
    """What went wrong since ``since``: counts by kind and the first message of each."""
    counts = load.counts(since)
    parts = [f"{counts[k]} {k} ({load.messages(k, since)[0][:80]})" for k in ("wrong", "permanent", "retryable")
             if counts[k]]  # fmt: skip
    return "; ".join(parts) or "no errors"


def lost(counts: collections.Counter) -> int:
    return counts["permanent"] + counts["wrong"]


def row(test: str, load: str, faults: str, ok: bool, lost_: str, detail: str) -> dict:
    return {"test": test, "load": load, "faults": faults, "result": "pass" if ok else "FAIL", "lost": lost_,
            "detail": detail}  # fmt: skip


def same_server_answers(launcher: Launcher, pid: int, ref: Reference) -> str:
    """'' when the same tritonserver is healthy and answers right over both protocols; else why not."""
    if launcher.server_pid() != pid:
        return f"tritonserver changed (pid {pid} -> {launcher.server_pid()})"
    problem = launcher.health()
    if problem:
        return f"unhealthy: {problem}"
    for protocol, url in (("grpc", launcher.grpc), ("http", launcher.http)):
        try:
            if not right(PolicyClient(url, protocol).infer(ref.request), ref.actions, ref.tolerance):
                return f"a wrong answer over {protocol}"
        except Exception as exc:  # noqa: BLE001
            return f"no answer over {protocol}: {error_line(exc)}"
    return ""


def http_status(url: str, body: bytes, headers: dict, method: str = "POST") -> int:
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


# ---- the rows ---------------------------------------------------------------------------------------
def crash_requests(launcher: Launcher, ref: Reference) -> dict:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    pid, statuses, sent = launcher.server_pid(), collections.Counter(), 0
    for model in ("policy", "encoder", "decoder"):
        for _, body, headers, _ in hostile.lying_http_bodies():
            statuses[
                f"http {http_status(f'http://{launcher.http}/v2/models/{model}/infer', body.encode(), headers)}"
            ] += 1
            sent += 1
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(launcher.grpc))
    for _, message in hostile.grpc_requests(service_pb2):
        sent += 1
        try:
            stub.ModelInfer(message, timeout=60)
            statuses["grpc OK"] += 1
        except grpc.RpcError as exc:
            statuses[f"grpc {exc.code().name}"] += 1
    refused = all(k.startswith("http 4") or k == "grpc INVALID_ARGUMENT" for k in statuses)
    after = same_server_answers(launcher, pid, ref)
    detail = ", ".join(f"{n}x {k}" for k, n in sorted(statuses.items())) + (f"; {after}" if after else "; same server")
    return row("crash requests", "none", f"{sent} lying requests", refused and not after, "-", detail)


def malformed(launcher: Launcher, ref: Reference) -> dict:
    pid, statuses, sent = launcher.server_pid(), collections.Counter(), 0
    for _, body, headers in hostile.malformed_http_bodies():
        statuses[f"http {http_status(f'http://{launcher.http}/v2/models/policy/infer', body, headers)}"] += 1
        sent += 1
    bad = dict(ref.request)
    cases = [{**bad, "state": np.zeros((1, 31), np.float32)}, {**bad, "state": np.zeros((1, 32), np.float64)},
             {k: v for k, v in bad.items() if k != "tokens"}, {**bad, "state": np.full((1, 32), np.nan, np.float32)},
             {**bad, "tokens": np.full((1, 48), 10**6, np.int32)}, {k: v[:0] for k, v in bad.items()},
             {k: np.repeat(v, 64, axis=0) for k, v in bad.items()}]  # fmt: skip
    for protocol, url in (("grpc", launcher.grpc), ("http", launcher.http)):
        client = PolicyClient(url, protocol)
        for case in cases:
            sent += 1
            try:
                client.infer(case)
                statuses[f"{protocol} answered"] += 1
            except Exception as exc:  # noqa: BLE001
                status = str(getattr(exc, "status", lambda: "?")()).removeprefix("StatusCode.")
                statuses[f"{protocol} {status}"] += 1
    refused = all(k.split()[1] == "INVALID_ARGUMENT" or k.split()[1].startswith("4") for k in statuses)
    after = same_server_answers(launcher, pid, ref)
    detail = ", ".join(f"{n}x {k}" for k, n in sorted(statuses.items())) + (f"; {after}" if after else "; same server")
    return row("malformed bodies", "none", f"{sent} bad requests", refused and not after, "-", detail)


def fuzz(launcher: Launcher, out: Path, examples: int, ref: Reference) -> dict:
    pid, report = launcher.server_pid(), out / "schemathesis.json"
    cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", str(SCHEMA), "-u", f"http://{launcher.http}",
           "-c", "not_a_server_error", "-n", str(examples), "--seed", "1", "-w", "1", "--generation-database", "none",
           "--no-color", "--request-timeout", "60", "--report", "json", "--report-json-path", str(report)]  # fmt: skip
    with open(out / "schemathesis.log", "w") as log:
        proc = subprocess.run(cmd, cwd=out, stdout=log, stderr=subprocess.STDOUT, timeout=1800, check=False)
    try:
        summary = json.loads(report.read_text())
    except (OSError, ValueError):
        return row("fuzz (schemathesis)", "none", "-", False, "-", f"no report (exit {proc.returncode}); see log")
    cases, failures = summary["test_cases"]["generated"], summary["test_cases"]["with_failures"]
    after = same_server_answers(launcher, pid, ref)
    tool = f", {sum(e['count'] for e in summary['errors'])} schemathesis errors" if summary["errors"] else ""
    detail = f"{failures} server errors (5xx) in {cases} generated requests{tool}; " + (after or "same server")
    return row("fuzz (schemathesis)", "none", f"{cases} generated requests", not failures and not after, "-", detail)


def keys(launcher: Launcher, ref: Reference) -> dict:
    import grpc
    import tritonclient.grpc as grpcclient

    key_file = launcher.workdir / io.ADMIN_KEY_FILE
    key, mode = key_file.read_text().strip(), key_file.stat().st_mode & 0o777
    index = f"http://{launcher.http}/v2/repository/index"
    http = {name: http_status(index, b"{}", headers) for name, headers in
            (("none", {}), ("wrong", {io.ADMIN_HEADER: "wrong"}), ("right", {io.ADMIN_HEADER: key}))}  # fmt: skip
    client, header = grpcclient.InferenceServerClient(launcher.grpc), io.GRPC_ADMIN_HEADER
    grpc_codes = {}
    for name, headers in (("none", None), ("wrong", {header: "wrong"}), ("right", {header: key})):
        try:
            client.get_model_repository_index(headers=headers)
            grpc_codes[name] = "OK"
        except Exception as exc:  # noqa: BLE001
            grpc_codes[name] = str(exc.status()).removeprefix("StatusCode.") if hasattr(exc, "status") else "error"
    del grpc
    ok = (mode == 0o600 and http["right"] == 200 and http["none"] >= 400 and http["wrong"] >= 400
          and grpc_codes["right"] == "OK" and grpc_codes["none"] != "OK" and grpc_codes["wrong"] != "OK")  # fmt: skip
    detail = (f"key file mode {mode:o}; HTTP none/wrong/right: {http['none']}/{http['wrong']}/{http['right']}; "
              f"gRPC: {grpc_codes['none']}/{grpc_codes['wrong']}/{grpc_codes['right']}")  # fmt: skip
    return row("admin key", "none", "6 admin calls", ok, "-", detail)


def overload(launcher: Launcher, out: Path, users: int, seconds: int, ref: Reference) -> dict:
    pid = launcher.server_pid()
    args = argparse.Namespace(host=launcher.grpc, protocol="grpc", mode="closed", rate_hz=10.0, batch=1,
                              model="policy", duration=seconds, metrics_url=launcher.metrics_url)  # fmt: skip
    step = sweep.run_step(args, users, out, label="overload_")
    waste = step["server"]["wasted_pct"]
    after = same_server_answers(launcher, pid, ref)
    detail = (f"{step['throughput']:.0f} answers/s, p99 {step['p99_ms']:.0f} ms, {step['failures']} turned away "
              f"of {step['requests']}, encoder work wasted {waste:.1f} % "
              f"({step['server']['wasted_encoder_requests']} requests); " + (after or "same server"))  # fmt: skip
    return row("overload", f"{users} users x {seconds} s", "-", waste < 5.0 and not after, f"{waste:.1f} % wasted",
               detail)  # fmt: skip


def group_rss_mb(pid: int) -> float:
    """Resident memory of tritonserver and its stubs (its process group), MiB."""
    total = 0
    for member in group_members(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{member}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total / 2**20


def soak(launcher: Launcher, seconds: int, ref: Reference) -> dict:
    pid, samples = launcher.server_pid(), []
    targets = [("grpc", launcher.grpc)] * 2 + [("http", launcher.http)] * 2
    with Load(targets, ref) as load:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            samples.append(group_rss_mb(pid))
            time.sleep(1.0)
    counts = load.counts()
    quarter = max(1, len(samples) // 4)
    first, last = float(np.mean(samples[:quarter])), float(np.mean(samples[-quarter:]))
    growth = last - first
    after = same_server_answers(launcher, pid, ref)
    ok = counts["ok"] > 0 and sum(counts.values()) == counts["ok"] and growth < max(64.0, 0.05 * first) and not after
    detail = (f"{counts['ok']} right answers, {describe(load, 0.0)}; memory {first:.0f} -> "
              f"{last:.0f} MiB (first/last quarter, tritonserver + stubs); " + (after or "same server"))  # fmt: skip
    return row("soak", f"4 clients x {seconds} s", "-", ok, str(sum(counts.values()) - counts["ok"]), detail)


def stub_kill(launcher: Launcher, ref: Reference) -> dict:
    victim = next(name for name in sorted(launcher.instances()) if name.startswith("decoder"))
    targets = [("grpc", launcher.grpc)] * 2 + [("http", launcher.http)] * 2
    with Load(targets, ref) as load:
        time.sleep(3)
        os.kill(launcher.instances()[victim], signal.SIGKILL)
        killed, seen_unhealthy, healthy_at, recovered = time.time(), False, None, None
        while time.time() - killed < 600:  # a pi0 restart compiles and captures again
            if launcher.health():
                seen_unhealthy, healthy_at = True, None
            elif seen_unhealthy and healthy_at is None:
                healthy_at = time.time()
            if healthy_at is not None and load.counts(healthy_at)["ok"]:  # a right answer asked for since
                recovered = time.time() - killed
                break
            time.sleep(0.05)
        time.sleep(2)
    counts = load.counts(killed)
    ok = seen_unhealthy and recovered is not None and counts["wrong"] == 0
    detail = (f"health unhealthy within the outage: {'yes' if seen_unhealthy else 'NO'}; recovered (healthy and a "
              f"right answer) in {recovered:.1f} s" if recovered is not None else "did not recover in 600 s")  # fmt: skip
    detail += f"; after the kill: {counts['ok']} right, {describe(load, killed)}"
    return row("stub kill", "4 clients", f"kill -9 {victim}", ok, str(lost(counts)), detail)


def sigterm(launcher: Launcher, ref: Reference) -> dict:
    from vlaserve.repository import drain_seconds

    instances = launcher.instances()
    segments = shm_files(instances.values())
    server_pid = launcher.server_pid()
    targets = [("grpc", launcher.grpc)] * 3 + [("http", launcher.http)] * 3
    with Load(targets, ref) as load:
        time.sleep(3)
        sent = time.time()
        launcher.process.send_signal(signal.SIGTERM)
        try:
            code = launcher.process.wait(drain_seconds(launcher.repository) + 60)
        except subprocess.TimeoutExpired:
            code = None
        took = time.time() - sent
        time.sleep(1)
    counts = load.counts(sent)
    left = [p for p in [server_pid, *instances.values()] if process_alive(p)] + [p for p in segments if p.exists()]
    ok = code == 0 and lost(counts) == 0 and not left
    detail = (f"launcher exit {code} after {took:.1f} s; after SIGTERM: {counts['ok']} right, "
              f"{describe(load, sent)}; left behind: {len(left)} processes or /dev/shm files")  # fmt: skip
    return row("SIGTERM under load", "6 clients", "SIGTERM to the launcher", ok, str(lost(counts)), detail)


# ---- the run ----------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    head = ("test", "load", "faults", "result", "lost", "detail")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[k]).replace("|", "/") for k in head) + " |" for r in rows]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.reliability", description=__doc__.splitlines()[0])
    parser.add_argument("--repository", default="model_repository", help="an exported repository (`make export`)")
    parser.add_argument("--quick", action="store_true", help="shorter overload, soak and fuzz (CI)")
    parser.add_argument("--overload-users", type=int, default=128, help="default: 128")
    parser.add_argument("--overload-seconds", type=int, help="default: 30 (15 with --quick)")
    parser.add_argument("--soak-seconds", type=int, help="default: 120 (30 with --quick)")
    parser.add_argument("--fuzz-examples", type=int, help="per operation and phase; default: 60 (20 with --quick)")
    parser.add_argument("--out", help="report folder (default: reports/reliability-<timestamp>)")
    parser.add_argument("--skip", default="", help=f"comma-separated checks to leave out, of: {', '.join(CHECKS)}")
    args = parser.parse_args(argv)
    args.skip = [name for name in args.skip.split(",") if name]
    unknown = sorted(set(args.skip) - set(CHECKS))
    if unknown:
        parser.error(f"--skip: unknown check {unknown[0]!r} (one of {', '.join(CHECKS)})")
    args.overload_seconds = args.overload_seconds or (15 if args.quick else 30)
    args.soak_seconds = args.soak_seconds or (30 if args.quick else 120)
    args.fuzz_examples = args.fuzz_examples or (20 if args.quick else 60)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    repository = Path(args.repository).resolve()
    if not manifest_path(repository, "encoder").is_file():
        print(f"reliability: error: {repository} has no export (run `make export`)", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or ROOT / "reports" / f"reliability-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    launcher = Launcher(repository, out / "work")
    print(f"[reliability] starting the server over {repository} (log: {out / 'launcher.log'}) ...", flush=True)
    started = time.monotonic()
    rows: list[dict] = []
    try:
        launcher.start()
        views = PolicyClient(launcher.grpc).views()
        request = make_request(1, views=views, seed=11, with_noise=True)
        dtype = read_manifest(repository, "decoder").dtype
        ref = Reference(request, PolicyClient(launcher.grpc).infer(request), REL_TOLERANCE[dtype])
        steps = {
            "crash": lambda: crash_requests(launcher, ref),
            "malformed": lambda: malformed(launcher, ref),
            "fuzz": lambda: fuzz(launcher, out, args.fuzz_examples, ref),
            "keys": lambda: keys(launcher, ref),
            "overload": lambda: overload(launcher, out, args.overload_users, args.overload_seconds, ref),
            "soak": lambda: soak(launcher, args.soak_seconds, ref),
            "stub-kill": lambda: stub_kill(launcher, ref),
            "sigterm": lambda: sigterm(launcher, ref),
        }
        steps = [(name, step) for name, step in steps.items() if name not in args.skip]
        for name, step in steps:
            print(f"[reliability] {name} ...", flush=True)
            t0 = time.monotonic()
            try:
                result = step()
            except Exception as exc:  # noqa: BLE001 - a row that could not run is a failed row, said so
                result = row(name, "-", "-", False, "-", f"could not run: {error_line(exc)}")
            rows.append(result)
            print(
                f"[reliability]   {result['result']} in {time.monotonic() - t0:.0f} s: {result['detail']}", flush=True
            )
    finally:
        launcher.stop()
    text = table(rows)
    summary = {"created": datetime.datetime.now().isoformat(timespec="seconds"), "repository": str(repository),
               "settings": vars(args), "seconds": round(time.monotonic() - started, 1), "rows": rows}  # fmt: skip
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.md").write_text(text + "\n")
    print(f"\nreliability ({summary['seconds']:.0f} s):\n{text}\n\nreport: {out}/results.json, {out}/table.md")
    return 0 if rows and all(r["result"] == "pass" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
