"""Triton's Prometheus metrics: scrape ``/metrics``, parse with prometheus_client, and take deltas.

The per-model figures of a load step come from the difference of two scrapes: request counts,
inference and execution counts (their ratio is the average batch size), and the cumulative queue,
compute and request durations (per request: divided by the successful request count), failures per
reason, and the requests the encoder computed that got no decoder answer (wasted work).
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
    "vlaserve_computed_requests",  # the runner's own: requests a model ran its artifact on
)
GPU_GAUGES = ("nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes")


def parse(text: str) -> dict:
    """{'models': {model: {counter: value}}, 'gpus': {gpu uuid: {gauge: value}}} from a metrics page."""
    models: dict[str, dict[str, float]] = {}
    failures: dict[str, dict[str, float]] = {}
    gpus: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            if name in COUNTERS and "model" in sample.labels:
                per_model = models.setdefault(sample.labels["model"], {})
                per_model[name] = per_model.get(name, 0.0) + sample.value
                if name == "nv_inference_request_failure":
                    reason = sample.labels.get("reason", "OTHER")
                    by_reason = failures.setdefault(sample.labels["model"], {})
                    by_reason[reason] = by_reason.get(reason, 0.0) + sample.value
            elif name in GPU_GAUGES:
                gpus.setdefault(sample.labels.get("gpu_uuid", "gpu"), {})[name] = sample.value
    return {"models": models, "failures": failures, "gpus": gpus}


def scrape(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return parse(resp.read().decode())


def deltas(before: dict, after: dict) -> dict:
    """Per-model figures over the interval between two scrapes; GPU gauges as read at the end."""
    out = {}
    for model, end in after["models"].items():
        start = before["models"].get(model, {})
        d = {k: end.get(k, 0.0) - start.get(k, 0.0) for k in COUNTERS}
        requests = d["nv_inference_request_success"]
        executions = d["nv_inference_exec_count"]
        ms = {k: d[k] / requests / 1000.0 if requests else 0.0 for k in COUNTERS if k.endswith("_us")}  # per request
        failed = {r: int(n - before.get("failures", {}).get(model, {}).get(r, 0))
                  for r, n in after.get("failures", {}).get(model, {}).items()}  # fmt: skip
        out[model] = {
            "requests": int(requests),
            # Triton's own count, by reason. Not summed into one figure: an ensemble counts a failed
            # step twice (reason OTHER), and a request rejected by a composing model's full queue
            # appears only there. The step's failures are the clients' count.
            "failures_by_reason": {r: n for r, n in failed.items() if n},
            "inferences": int(d["nv_inference_count"]),
            "computed": int(d.get("vlaserve_computed_requests", 0)),
            "executions": int(executions),
            "avg_batch_size": d["nv_inference_count"] / executions if executions else 0.0,
            "request_ms": ms["nv_inference_request_duration_us"],
            "queue_ms": ms["nv_inference_queue_duration_us"],
            "compute_ms": ms["nv_inference_compute_input_duration_us"]
            + ms["nv_inference_compute_infer_duration_us"]
            + ms["nv_inference_compute_output_duration_us"],
            # the compute's three parts: inputs into the model, the model's execute, outputs out of it
            "input_ms": ms["nv_inference_compute_input_duration_us"],
            "infer_ms": ms["nv_inference_compute_infer_duration_us"],
            "output_ms": ms["nv_inference_compute_output_duration_us"],
        }
    gpus = {
        uuid: {
            "utilization": g.get("nv_gpu_utilization", 0.0),
            "memory_used_gib": g.get("nv_gpu_memory_used_bytes", 0.0) / 2**30,
        }
        for uuid, g in after["gpus"].items()
    }
    enc, dec = out.get("encoder", {}), out.get("decoder", {})
    # requests the encoder computed that the decoder never computed: work thrown away (the runner's own
    # counts; the Python backend counts an error answer as a success, so Triton's are no measure here)
    wasted = max(0, enc.get("computed", 0) - dec.get("computed", 0))
    return {"models": out, "gpus": gpus,
            "wasted_encoder_requests": wasted,
            "wasted_pct": 100.0 * wasted / enc["computed"] if enc.get("computed") else 0.0}  # fmt: skip
