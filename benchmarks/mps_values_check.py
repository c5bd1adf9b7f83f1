"""Does an MPS share serve right actions, or refuse to load? One server start per encoder:decoder split.

    python benchmarks/mps_values_check.py --repository /tmp/pi0_repo --splits 40:40,50:50 --out $OUT/values.json

For each split, the spec's ``gpu_mps`` variant (one instance per model, compiled layers and CUDA graphs)
with the encoder's and the decoder's instance at those MPS thread percentages is served with ``--mps``.
Every instance screens its products and checks the golden samples at start (vlaserve.value_check): at a
share that computes wrong products the server must fail to start with the instance's one-line reason;
at a right one it must serve, and the served actions of the golden request (batch 1, over gRPC and HTTP)
are compared with the actions the export computed for it. Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from vlaserve import repository
from vlaserve.client import PolicyClient
from vlaserve.model.parity import REL_TOLERANCE as GOLDEN_TOLERANCE
from vlaserve.server import variant_server
from vlaserve.status import format_table, read_status
from vlaserve.value_check import golden_reference


def check_split(args, encoder_pct: int, decoder_pct: int) -> dict:
    repo, workdir = Path(args.repository), Path(args.workdir)
    spec = repository.load_spec(Path(__file__).resolve().parents[1] / "model_repository" / "spec.yaml", args.variant)
    for name, pct in zip(repository.RUNNER_MODELS, (encoder_pct, decoder_pct)):
        groups = [{**dataclasses.asdict(g), "mps_thread_percentage": pct} for g in spec.runners[name].instance_groups]
        spec = spec.with_model(name, instance_groups=groups)
    label = f"{encoder_pct}:{decoder_pct}"
    server = variant_server(spec, repo, workdir / f"repo_{encoder_pct}_{decoder_pct}", workdir,
                            cuda_memory_pool_mb=2048, ready_timeout=600)  # fmt: skip
    row = {"split": label}
    started = time.perf_counter()
    try:
        server.start()
    except RuntimeError as exc:
        row.update(loaded=False, seconds=round(time.perf_counter() - started, 1), refusals=server.refusals())
        row["error"] = str(exc).splitlines()[0]
        row["instances"] = read_status(workdir)
        print(f"[values] {label}: refused in {row['seconds']} s:\n  " + "\n  ".join(row["refusals"] or [row["error"]]))
        return row
    try:
        row.update(loaded=True, seconds=round(time.perf_counter() - started, 1))
        request, expected = golden_reference(repo)
        rels = []
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            client = PolicyClient(url, protocol, timeout_s=300)
            for _ in range(3):
                served = client.infer(request)
                rels.append(float(np.linalg.norm(served - expected) / np.linalg.norm(expected)))
        row["rel_vs_export"] = [float(f"{r:.3g}") for r in rels]
        row["right"] = all(r <= GOLDEN_TOLERANCE[args.dtype] for r in rels)
        rows = read_status(workdir)
        row["instances"] = rows
        print(f"[values] {label}: ready in {row['seconds']} s, served actions rel vs export {row['rel_vs_export']}")
        print(format_table(rows))
    finally:
        server.stop()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/mps_values_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--repository", required=True, help="an exported repository (make export ... VARIANT=gpu)")
    parser.add_argument("--splits", default="40:40,50:50", help="encoder:decoder percentages (default: 40:40,50:50)")
    parser.add_argument("--variant", default="gpu_mps", help="the spec variant to set the percentages in")
    parser.add_argument("--dtype", default="bf16", help="the export's dtype, for the tolerance (default: bf16)")
    parser.add_argument("--workdir", default="/tmp/mps_values", help="server workdir (its mps-check.json is read)")
    parser.add_argument("--out", default="/tmp/mps_values/values.json")
    args = parser.parse_args()
    rows = [check_split(args, *map(int, split.split(":"))) for split in args.splits.split(",")]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print("\nsplit (enc:dec)  loaded  seconds  served actions vs export (rel)   refusal")
    for r in rows:
        verdict = str(r.get("rel_vs_export", "-"))
        reason = (r.get("refusals") or [r.get("error", "")])[0][:150] if not r["loaded"] else ""
        print(f"{r['split']:>15}  {str(r['loaded']):6}  {r['seconds']:7}  {verdict:31}  {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
