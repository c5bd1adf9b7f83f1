"""``python -m vlaserve.status`` (``make mps-status``): every model instance's process, device and SM count.

Each runner instance writes ``<workdir>/instances/<instance>.json`` when it is ready, or when it refuses
to load (see :mod:`vlaserve.runner`): its PID, device, runtime, MPS thread percentage, the SM count its
CUDA context actually got, the count that percentage should give, and its value checks (``pass``, or
which check failed; the worst error of the product screen and of the golden samples, with the tolerance).
An instance of the policy run as one model shows a row per step (``policy/encoder``, ``policy/decoder``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

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


def format_table(rows: list[dict]) -> str:
    cells = [[str(r.get(c, "-")) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlaserve.status", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=".vlaserve", help="the server's --workdir (default: .vlaserve)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    rows = read_status(Path(args.workdir))
    if not rows:
        print(
            f"status: error: no instance status under {args.workdir}/instances (is the server running?)",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
