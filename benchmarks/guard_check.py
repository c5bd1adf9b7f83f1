"""The HTTP guard and shutdown on a real export: batch-1 latency through the guard and without it, the crash
request, and how the server stops (exit code, seconds, shared memory left behind).

    python benchmarks/guard_check.py --repository /tmp/pi0_repo --variant gpu --out $OUT/guard.json

For each of guard on and off, the variant is served, then 50 batch-1 requests over HTTP and gRPC
(after 5 to warm up) are timed. With the guard on, the 128-byte request claiming images of shape
[100000, 2, 224, 224, 3] is sent to `policy` over HTTP and must be refused, with the same server process
then still answering. Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from vlaserve import repository
from vlaserve.client import PolicyClient, make_request
from vlaserve.manifest import read_manifest, read_manifest_settings
from vlaserve.server import variant_server


def shm_regions() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("triton_python_backend_shm_region_*")}


def p50_ms(client, request, repeats: int = 50) -> float:
    for _ in range(5):
        client.infer(request)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        client.infer(request)
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", required=True)
    parser.add_argument("--variant", default="gpu")
    parser.add_argument("--out", default="/tmp/guard.json")
    args = parser.parse_args()
    repo = Path(args.repository)
    settings = read_manifest_settings(repo)
    spec = repository.load_spec(Path(__file__).resolve().parents[1] / "model_repository" / "spec.yaml", args.variant)
    manifest = read_manifest(repo, "encoder")
    request = make_request(1, settings.views, seed=0, with_noise=True, vocab_size=manifest.vocab_size)
    rows = []
    for guard in (True, False):
        before = shm_regions()
        server = variant_server(spec, repo, Path("/tmp/guard_check_repo"), Path("/tmp/guard_check"),
                                cuda_memory_pool_mb=2048, ready_timeout=600, http_guard=guard)  # fmt: skip
        started = time.perf_counter()
        server.start()
        row = {"guard": guard, "ready_s": round(time.perf_counter() - started, 1)}
        row["http_p50_ms"] = p50_ms(PolicyClient(server.http_url, "http", timeout_s=300), request)
        row["grpc_p50_ms"] = p50_ms(PolicyClient(server.grpc_url, "grpc", timeout_s=300), request)
        if guard:
            body = json.dumps({"inputs": [{"name": "images", "shape": [100000, 2, 224, 224, 3], "datatype": "UINT8",
                                           "data": list(range(10))}]}).encode()  # fmt: skip
            try:
                urllib.request.urlopen(urllib.request.Request(f"http://{server.http_url}/v2/models/policy/infer",
                                                              data=body, method="POST"), timeout=60)  # fmt: skip
                row["crash_request"] = "accepted"
            except urllib.error.HTTPError as exc:
                row["crash_request"] = f"{exc.code}: {json.loads(exc.read())['error'][:90]}"
            pid = server.process.pid
            PolicyClient(server.grpc_url, "grpc", timeout_s=300).infer(request)
            row["alive_after"] = server.process.poll() is None and server.process.pid == pid
        stopping = time.perf_counter()
        row["exit_code"] = server.stop(timeout=60)
        row["stop_s"] = round(time.perf_counter() - stopping, 1)
        row["shm_left"] = len(shm_regions() - before)
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print("\nguard  ready s  HTTP p50 ms  gRPC p50 ms  crash request  alive after  exit code  stop s  shm left")
    for r in rows:
        print(f"{str(r['guard']):5}  {r['ready_s']:7}  {r['http_p50_ms']:11}  {r['grpc_p50_ms']:11}  "
              f"{r.get('crash_request', '-')[:13]:13}  {str(r.get('alive_after', '-')):11}  {r['exit_code']!s:9}  "
              f"{r['stop_s']:6}  {r['shm_left']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
