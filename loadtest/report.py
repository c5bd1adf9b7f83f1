"""Tables and the plot of a sweep or a comparison."""

from __future__ import annotations

from pathlib import Path

COLUMNS = [
    ("users", "users", "{:d}"),
    ("throughput", "inf/s", "{:.1f}"),
    ("p50_ms", "p50 ms", "{:.1f}"),
    ("p90_ms", "p90 ms", "{:.1f}"),
    ("p95_ms", "p95 ms", "{:.1f}"),
    ("p99_ms", "p99 ms", "{:.1f}"),
    ("failures", "fail", "{:d}"),
    ("wasted_pct", "wasted %", "{:.1f}"),
    ("avg_batch_encoder", "batch enc", "{:.2f}"),
    ("avg_batch_decoder", "batch dec", "{:.2f}"),
    ("queue_ms", "queue ms", "{:.1f}"),
    ("compute_ms", "compute ms", "{:.1f}"),
]


def row_of(step: dict) -> dict:
    """The flat figures of one step, for tables."""
    models = step["server"]["models"]
    enc, dec = models.get("encoder", {}), models.get("decoder", {})
    if not enc and not dec:  # the policy run as one model (spec pipeline one_model): its batches are both steps'
        enc = models.get("policy", {})
        dec = {"avg_batch_size": enc.get("avg_batch_size", 0.0)}
    return {
        "users": step["users"],
        "throughput": step["throughput"],
        "p50_ms": step["p50_ms"],
        "p90_ms": step["p90_ms"],
        "p95_ms": step["p95_ms"],
        "p99_ms": step["p99_ms"],
        "failures": step["failures"],
        "wasted_pct": step["server"].get("wasted_pct", 0.0),
        "avg_batch_encoder": enc.get("avg_batch_size", 0.0),
        "avg_batch_decoder": dec.get("avg_batch_size", 0.0),
        "queue_ms": enc.get("queue_ms", 0.0) + dec.get("queue_ms", 0.0),
        "compute_ms": enc.get("compute_ms", 0.0) + dec.get("compute_ms", 0.0),
    }


def table(rows: list[dict], columns=COLUMNS, marks: dict[int, str] | None = None) -> str:
    """A plain-text table; ``marks`` puts a marker after the row of that index."""
    head = [title for _, title, _ in columns]
    body = [[fmt.format(r[key]) for key, _, fmt in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    for i, b in enumerate(body):
        lines.append(
            "  ".join(c.rjust(w) for c, w in zip(b, widths)) + (f"  {marks[i]}" if marks and i in marks else "")
        )
    return "\n".join(lines)


def best_under_slo(steps: list[dict], slo_ms: float) -> dict | None:
    """The step with the highest throughput whose p99 is within the SLO and that had no failures."""
    ok = [s for s in steps if s["p99_ms"] <= slo_ms and s["failures"] == 0 and s["requests"] > 0]
    return max(ok, key=lambda s: s["throughput"]) if ok else None


def compare_table(results: dict[str, list[dict]], slo_ms: float) -> str:
    """One row per variant: its best step under the SLO; the best variant marked."""
    rows, missing = [], []
    for variant, steps in results.items():
        best = best_under_slo(steps, slo_ms)
        if best:
            rows.append({"variant": variant, **row_of(best)})
        else:
            missing.append(variant)
    lines = []
    if rows:
        top = max(range(len(rows)), key=lambda i: rows[i]["throughput"])
        lines.append(
            table(rows, [("variant", "variant", "{}"), *COLUMNS], {top: f"<- best under p99 <= {slo_ms:g} ms"})
        )
    lines += [f"{variant}: no step with p99 <= {slo_ms:g} ms and no failures" for variant in missing]
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: Path, slo_ms: float | None = None) -> Path:
    """Throughput vs p99 latency, and throughput vs users, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant, steps in results.items():
        xs = [s["throughput"] for s in steps]
        left.plot(xs, [s["p99_ms"] for s in steps], marker="o", label=variant)
        right.plot([s["users"] for s in steps], xs, marker="o", label=variant)
    if slo_ms:
        left.axhline(slo_ms, color="grey", linestyle="--", linewidth=1, label=f"p99 SLO {slo_ms:g} ms")
    left.set(xlabel="throughput (inferences/s)", ylabel="p99 latency (ms)", title="latency vs throughput")
    right.set(xlabel="concurrent users", ylabel="throughput (inferences/s)", title="throughput vs users")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
