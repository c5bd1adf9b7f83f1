"""LeRobot's PI0Policy in-process, batch 1: the open pi0 runtime vlaserve is compared with, timed as vlaserve's
in-process peers are (one request after another, inputs from host memory, actions back to it).

Runs in a Python that has LeRobot 0.4.4 and the transformers 4.53.2 that openpi's pi0 patches: here
``.venv-lerobot`` (``make lerobot-venv``); on a GPU machine without network, the image's Python with the
packages ``benchmarks/build_lerobot_carry.sh`` carries (``bash benchmarks/gpu_lerobot_peer.sh``). LeRobot's
policy is built as tests/lerobot/reference.py builds it (the import without LeRobot's dataset and video
tooling, seeded random weights of order one), at the sizes of a vlaserve preset (pi0: LeRobot's own). The
request is vlaserve's (``vlaserve.client.make_request``: camera-like frames, a prompt of ``--prompt`` tokens
padded to 48, a state, the flow's noise). The timed policy's actions are checked against the same weights
in float32 (``--dtype bfloat16``): a row whose actions are off by more than the bf16 parity tolerance is
marked void. Prints one line per setting and writes ``--out``.

    .venv-lerobot/bin/python benchmarks/lerobot_peer.py --preset tiny --device cpu --dtype float32 --repeats 3 --out /tmp/lerobot.json
    python3 benchmarks/lerobot_peer.py --device cuda --dtype bfloat16 --out $OUT/lerobot.json       # the GPU machine
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "lerobot"))  # (another installed package may be named "tests")

import reference  # noqa: E402 - tests/lerobot/reference.py: how the LeRobot equivalence tests build PI0Policy

from vlaserve.client import make_request  # noqa: E402
from vlaserve.model.parity import REL_TOLERANCE  # noqa: E402
from vlaserve.model.presets import get_preset  # noqa: E402


def run(policy, obs: dict, noise, device: str):
    """One request: inputs to the device, the action chunk back to the host."""
    import torch

    with torch.no_grad():
        on_device = {k: v.to(device, non_blocking=True) for k, v in obs.items()}
        return policy.predict_action_chunk(on_device, noise=noise.to(device)).float().cpu()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="pi0", help="vlaserve preset whose sizes LeRobot's policy is built at")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=20, help="valid prompt tokens (of 48)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--compile", action="store_true", help="also time LeRobot's compile_model=True")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    import transformers

    cfg = get_preset(args.preset, args.views)
    configuration, modeling = reference.import_lerobot_pi0()
    reference.resize_lerobot(modeling, dataclasses.asdict(cfg))
    vocab = min(cfg.vocab_size, 1024)
    request = make_request(1, args.views, seed=1, prompt=" ".join(f"w{i}" for i in range(args.prompt)),
                           with_noise=True, vocab_size=vocab)  # fmt: skip
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    # the reference: the same weights in float32, one call
    side = cfg.vision.image_size
    policy, cameras = reference.make_policy(configuration, modeling, request, side, args.seed, device=args.device,
                                            dtype="float32")  # fmt: skip
    obs, noise = reference.observation(request, cameras, side), torch.from_numpy(request["noise"])
    expected = run(policy, obs, noise, args.device)
    params = sum(p.numel() for p in policy.parameters())
    del policy
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()

    rows = []
    for compiled in (False, True) if args.compile else (False,):
        policy, _ = reference.make_policy(configuration, modeling, request, side, args.seed, device=args.device,
                                          dtype=args.dtype, compile_model=compiled)  # fmt: skip
        for _ in range(3):  # warm-up (and compilation)
            actions = run(policy, obs, noise, args.device)
        sync()
        ms = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            actions = run(policy, obs, noise, args.device)
            ms.append((time.perf_counter() - t0) * 1e3)
        rel = float((actions - expected).norm() / expected.norm())
        tolerance = REL_TOLERANCE["bf16" if args.dtype == "bfloat16" else "fp32"]
        row = {"compile_model": compiled, "dtype": args.dtype, "p50_ms": round(statistics.median(ms), 2),
               "p99_ms": round(sorted(ms)[min(len(ms) - 1, int(0.99 * len(ms)))], 2),
               "rel_to_float32": float(f"{rel:.3g}"), "finite": bool(np.isfinite(actions.numpy()).all()),
               "void": not (rel <= tolerance and np.isfinite(actions.numpy()).all())}  # fmt: skip
        rows.append(row)
        print(f"[lerobot] PI0Policy {args.dtype}{' compiled' if compiled else ''}: p50 {row['p50_ms']} ms, "
              f"p99 {row['p99_ms']} ms, rel {rel:.2g} to float32{' (VOID)' if row['void'] else ''}", flush=True)  # fmt: skip
        del policy
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    args.out.write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "preset": args.preset, "views": args.views, "prompt": args.prompt,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "torch": torch.__version__, "transformers": transformers.__version__, "parameters": params,
        "repeats": args.repeats, "rows": rows,
    }, indent=2))  # fmt: skip
    return 1 if any(r["void"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
