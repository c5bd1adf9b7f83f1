"""``python -m vlaserve.status`` (``make mps-status``): every model instance's process, device and SM count.

Each runner instance writes ``<workdir>/instances/<instance>.json`` when it is ready, or when it refuses
to load (see :mod:`vlaserve.runner`): its PID, device, runtime, MPS thread percentage, the SM count its
CUDA context actually got, the count that percentage should give, and its value checks (``pass``, or
which check failed; the worst error of the product screen and of the golden samples, with the tolerance).
While it serves, ``<instance>.executes`` beside it sums its executes' phases (vlaserve.runner.PHASES; not
shown in the table).
An instance of the policy run as one model shows a row per step (``policy/encoder``, ``policy/decoder``).
On a GPU host a second table sums up each GPU: its instances (alive of all), their models, and the MPS
thread percentages they hold together.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vlaserve import interface as io

COLUMNS = ("model", "instance", "pid", "alive", "kind", "device", "runtime", "mps_thread_percentage", "sm_count",
           "expected_sm_count", "probe_tflops", "compiled", "cuda_graphs", "value_check", "products_err",
           "golden_err")  # fmt: skip


def _flatten(row: dict) -> dict:
    """The value checks' worst errors as columns (the full results stay in the JSON)."""
    for check in ("products", "golden"):
        result = row.get(f"{check}_check")
        if result:
            row[f"{check}_err"] = f"{result['worst']:.2g} (<= {result['tolerance']:g})"
    return row


def read_status(workdir: Path) -> list[dict]:
    rows = []
    for path in sorted((Path(workdir) / "instances").glob("*.json")):
        row = json.loads(path.read_text())
        try:
            os.kill(int(row["pid"]), 0)
            row["alive"] = "yes"
        except (OSError, KeyError, ValueError):
            row["alive"] = "no"
        steps = row.pop("steps", None)
        if steps:  # the policy run as one model: a row per step, each with its own checks and graphs
            rows += [_flatten({**row, **step, "model": f"{row['model']}/{name}"}) for name, step in steps.items()]
        else:
            rows.append(_flatten(row))
    return rows


def per_gpu(rows: list[dict]) -> list[dict]:
    """One row per device: its instances (counted once, though a one-model instance has a row per step)."""
    devices: dict[str, dict] = {}
    for row in rows:
        device = row.get("device", "-")
        if not str(device).startswith("cuda"):
            continue
        entry = devices.setdefault(device, {"device": device, "instances": {}, "models": set()})
        entry["models"].add(str(row.get("model", "-")).split("/")[0])
        entry["instances"][row.get("instance")] = row
    out = []
    for device in sorted(devices, key=lambda d: int(d.split(":")[1]) if ":" in d else 0):
        entry = devices[device]
        instances = entry["instances"].values()
        percentages = [r["mps_thread_percentage"] for r in instances if r.get("mps_thread_percentage") is not None]
        out.append({
            "device": device,
            "instances": f"{sum(r.get('alive') == 'yes' for r in instances)}/{len(instances)}",
            "models": ",".join(sorted(entry["models"])),
            "mps_thread_percentages": "+".join(map(str, percentages)) + f" = {sum(percentages)}" if percentages else "-",
        })  # fmt: skip
    return out


def format_table(rows: list[dict], columns=COLUMNS) -> str:
    cells = [[str(r.get(c, "-")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlaserve.status", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=io.DEFAULT_WORKDIR, help="the server's --workdir (default: .vlaserve)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    rows = read_status(Path(args.workdir))
    if not rows:
        print(
            f"status: error: no instance status under {args.workdir}/instances (is the server running?)",
            file=sys.stderr,
        )
        return 1
    gpus = per_gpu(rows)
    if args.json:
        print(json.dumps({"instances": rows, "gpus": gpus}, indent=2))
    else:
        print(format_table(rows))
        if gpus:
            print()
            print(format_table(gpus, ("device", "instances", "models", "mps_thread_percentages")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
