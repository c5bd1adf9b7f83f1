"""Are the served actions right under MPS? The tuned MPS variant with CUDA graphs on neither, one or both
models, each against the in-process runtime (rel error at batch 1 and 4, several requests).

    python benchmarks/mps_values_check.py --repository /tmp/pi0_repo --reference /tmp/peers/inprocess_actions.npz
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlaserve import repository  # noqa: E402
from vlaserve.client import PolicyClient, make_request  # noqa: E402
from vlaserve.server import ServerOptions, TritonServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repository", required=True)
    parser.add_argument("--reference", required=True, help="inprocess_actions.npz of benchmarks/peers.py")
    parser.add_argument("--variant", default="gpu_mps")
    parser.add_argument("--out", default="/tmp/mps_values")
    parser.add_argument(
        "--percentages", help="encoder:decoder MPS percentages to try with graphs on both, e.g. 100:100,60:40"
    )
    args = parser.parse_args()
    repo, out = Path(args.repository), Path(args.out)
    reference = np.load(args.reference)["graphs"]
    settings = repository.read_manifest_settings(repo)
    base = repository.load_spec(Path(__file__).resolve().parents[1] / "model_repository" / "spec.yaml", args.variant)
    rows = []
    cases = [({"encoder": e, "decoder": d}, None) for e in (False, True) for d in (False, True)]
    if args.percentages:
        cases = [
            ({"encoder": True, "decoder": True}, tuple(map(int, p.split(":")))) for p in args.percentages.split(",")
        ]
    for graphs, percentages in cases:
        spec = copy.deepcopy(base)
        for name, on in graphs.items():
            spec["models"][name]["cuda_graphs"] = on
        label = "graphs:" + ("+".join(n for n, on in graphs.items() if on) or "none")
        if percentages:
            for name, pct in zip(repository.RUNNER_MODELS, percentages):
                for group in spec["models"][name]["instance_groups"]:
                    group["mps_thread_percentage"] = pct
            label += f",mps:{percentages[0]}:{percentages[1]}"
        variant_repo = repository.write_repository(
            spec, out / label.replace(":", "_").replace("+", "_").replace(",", "_"), settings, artifacts_from=repo
        )
        mps = any(
            "mps_thread_percentage" in g for n in repository.RUNNER_MODELS for g in spec["models"][n]["instance_groups"]
        )
        options = ServerOptions(model_repository=variant_repo, http_port=0, grpc_port=0, metrics_port=0,
                                workdir=out / "server", mps=mps, cuda_memory_pool_mb=2048, ready_timeout=600)  # fmt: skip
        with TritonServer(options) as server:
            client = PolicyClient(server.grpc_url, "grpc", timeout_s=300)
            request = make_request(1, settings.views, seed=0, with_noise=True, vocab_size=257152)
            rels = []
            for _ in range(5):
                served = client.infer(request)
                rels.append(float(np.linalg.norm(served - reference) / np.linalg.norm(reference)))
            again = make_request(4, settings.views, seed=4, with_noise=True, vocab_size=257152)
            first, second = client.infer(again), client.infer(again)
            rows.append({"config": label, "mps": mps, "rel_batch1": [round(r, 4) for r in rels],
                         "batch4_repeat_rel": float(np.linalg.norm(first - second) / np.linalg.norm(second))})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    (out / "mps_values.json").write_text(json.dumps(rows, indent=2))
    print("\nconfig                     rel vs in-process (5 calls)          batch-4 repeat rel")
    for r in rows:
        print(f"{r['config']:26} {str(r['rel_batch1']):36} {r['batch4_repeat_rel']:.2e}")


if __name__ == "__main__":
    main()
