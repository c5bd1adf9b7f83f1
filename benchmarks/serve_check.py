"""GPU check of the served policy: values against in-process PyTorch, and batch-1 latency.

    python benchmarks/serve_check.py --repository /tmp/pi0_repo --out $OUT/serve_check.json

Starts the embedded server over an exported repository (GPU instances), sends requests with noise over
gRPC and HTTP at batch 1 and 4, compares the actions with the same policy run in-process on the GPU
(same preset, seed and dtype), and times batch-1 requests against in-process eager calls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.peers import latencies
from vlaserve.client import PolicyClient, make_request
from vlaserve.manifest import read_manifest
from vlaserve.model.policy import build_policy
from vlaserve.model.presets import get_preset
from vlaserve.server import ServerOptions, TritonServer
from vlaserve.value_check import TORCH_DTYPE


def inprocess_runtime_p50(repo: Path, request: dict, repeats: int) -> float:
    """The served runtime (TorchScript on the GPU) called in-process: encoder, then decoder."""
    from vlaserve.runtimes import load_runtime

    def runtime(name, outputs):
        return load_runtime("torchscript", repo / name / "1", outputs, "cuda:0")

    encoder, decoder = runtime("encoder", ["prefix_kv", "prefix_mask"]), runtime("decoder", ["actions"])
    tensors = {k: torch.from_numpy(v) for k, v in request.items()}

    def once():
        prefix_kv, mask = encoder.run({"images": tensors["images"], "tokens": tensors["tokens"]})
        actions = decoder.run(
            {"prefix_kv": prefix_kv, "prefix_mask": mask, "state": tensors["state"], "noise": tensors["noise"]}
        )
        actions[0].cpu()

    return statistics.median(latencies(once, repeats, warmup=5))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repository", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    repo = Path(args.repository)
    manifest = read_manifest(repo, "encoder")
    cfg = get_preset(manifest.preset, manifest.views, manifest.prompt_tokens)
    policy = build_policy(cfg, manifest.seed, getattr(torch, TORCH_DTYPE[manifest.dtype]), device="cuda")
    result = {"preset": cfg.name, "views": cfg.views, "dtype": manifest.dtype, "gpu": torch.cuda.get_device_name()}

    def local(request):
        t = {k: torch.from_numpy(v).cuda() for k, v in request.items()}
        with torch.inference_mode():
            out = policy(t["images"], t["tokens"], t["state"], t["noise"])
        return out.cpu().numpy()

    options = ServerOptions(
        model_repository=repo, http_port=0, grpc_port=0, metrics_port=0, workdir=Path("/tmp/serve_check")
    )
    start = time.perf_counter()
    with TritonServer(options) as server:
        result["server_ready_s"] = round(time.perf_counter() - start, 1)
        print(f"server ready in {result['server_ready_s']} s", flush=True)
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            client = PolicyClient(url, protocol, timeout_s=300)
            for batch in (1, 4):
                request = make_request(batch, cfg.views, seed=batch, with_noise=True, vocab_size=cfg.vocab_size)
                served, expected = client.infer(request), local(request)
                err = float(np.linalg.norm(served - expected) / np.linalg.norm(expected))
                result[f"rel_err_{protocol}_batch{batch}"] = err
                print(
                    f"{protocol} batch {batch}: rel err vs in-process {err:.2e}, |actions| mean {np.abs(served).mean():.3f}"
                )
        client = PolicyClient(server.grpc_url, "grpc", timeout_s=300)
        request = make_request(1, cfg.views, seed=0, with_noise=True, vocab_size=cfg.vocab_size)
        served_ms = latencies(lambda: client.infer(request), args.repeats, warmup=5)
        status = [json.loads(p.read_text()) for p in sorted(server.status_dir.glob("*.json"))]
    local(request)

    def local_sync():
        local(request)
        torch.cuda.synchronize()

    local_ms = latencies(local_sync, args.repeats, warmup=0)
    result["inprocess_runtime_batch1_p50_ms"] = inprocess_runtime_p50(repo, request, args.repeats)
    result.update(
        triton_batch1_p50_ms=statistics.median(served_ms),
        triton_batch1_p99_ms=float(np.percentile(served_ms, 99)),
        inprocess_eager_batch1_p50_ms=statistics.median(local_ms),
        instances=status,
    )
    print(json.dumps({k: v for k, v in result.items() if k != "instances"}, indent=1))
    for s in status:
        print(s)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
