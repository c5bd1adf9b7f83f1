"""Locust against the real server: counts agree with Triton's, reports are written, failures are clear."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from loadtest import metrics, report, sweep
from vlaserve.server import free_port


@pytest.fixture(scope="module")
def sweep_result(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    args = sweep.parse_args(
        [
            "--host",
            server.http_url,
            "--metrics-url",
            server.metrics_url,
            "--users",
            "1,4",
            "--duration",
            "4",
            "--out",
            str(out),
        ]
    )
    return sweep.run(args), out


def test_locust_counts_match_the_server(sweep_result):
    summary, _ = sweep_result
    for step in summary["results"]["sweep"]:
        assert step["failures"] == 0 and step["requests"] > 0 and step["throughput"] > 0
        assert step["server"]["wasted_pct"] < 5.0  # no failures: what the encoder computed was answered
        served = step["server"]["models"]["policy"]["inferences"]
        assert abs(served - step["requests"] * step["batch"]) <= max(2, 0.03 * served), (served, step["requests"])


def test_sweep_writes_reports_with_consistent_metrics(sweep_result):
    summary, out = sweep_result
    assert json.loads((out / "results.json").read_text())["results"]["sweep"][0]["users"] == 1
    assert (out / "sweep.png").stat().st_size > 10_000
    for users in (1, 4):
        assert (out / f"users_{users}_stats.csv").exists() and (out / f"users_{users}.html").exists()
    for step in summary["results"]["sweep"]:
        for name in ("encoder", "decoder"):
            m = step["server"]["models"][name]
            assert m["avg_batch_size"] >= 1.0
            assert m["queue_ms"] + m["compute_ms"] <= m["request_ms"] * 1.01 + 0.05, m
        assert step["p50_ms"] <= step["p90_ms"] <= step["p99_ms"]
    assert "inf/s" in report.table([report.row_of(s) for s in summary["results"]["sweep"]])


def test_best_under_slo_is_marked():
    steps = {
        "a": [{"users": 1, "throughput": 10.0, "p99_ms": 50.0, "failures": 0, "requests": 5, **_blank()}],
        "b": [
            {"users": 1, "throughput": 20.0, "p99_ms": 90.0, "failures": 0, "requests": 5, **_blank()},
            {"users": 8, "throughput": 99.0, "p99_ms": 900.0, "failures": 0, "requests": 5, **_blank()},
        ],
    }
    table = report.compare_table(steps, slo_ms=100)
    best = [line for line in table.splitlines() if "best" in line]
    assert len(best) == 1 and best[0].split()[0] == "b" and "20.0" in best[0]


def _blank():
    return {"p50_ms": 1.0, "p90_ms": 1.0, "p95_ms": 1.0, "server": {"models": {}}}


def test_metrics_parser_reads_triton_text():
    text = (
        '# TYPE nv_inference_count counter\nnv_inference_count{model="encoder",version="1"} 12\n'
        '# TYPE nv_inference_exec_count counter\nnv_inference_exec_count{model="encoder",version="1"} 4\n'
        '# TYPE nv_inference_request_success counter\nnv_inference_request_success{model="encoder",version="1"} 12\n'
        '# TYPE nv_gpu_utilization gauge\nnv_gpu_utilization{gpu_uuid="GPU-1"} 0.5\n'
    )
    before = metrics.parse(text.replace(" 12\n", " 2\n").replace(" 4\n", " 1\n"))
    d = metrics.deltas(before, metrics.parse(text))
    assert d["models"]["encoder"]["inferences"] == 10 and d["models"]["encoder"]["avg_batch_size"] == pytest.approx(
        10 / 3
    )
    assert d["gpus"]["GPU-1"]["utilization"] == 0.5


def test_failures_are_kept_by_reason_and_wasted_encoder_work_is_counted():
    def page(enc, dec, other):
        return (
            f'vlaserve_computed_requests{{model="encoder",instance="encoder_cpu_0"}} {enc}\n'
            f'vlaserve_computed_requests{{model="decoder",instance="decoder_cpu_0"}} {dec}\n'
            f'nv_inference_request_failure{{model="policy",reason="OTHER",version="1"}} {other}\n'
            'nv_inference_request_failure{model="policy",reason="REJECTED",version="1"} 0\n'
        )

    d = metrics.deltas(metrics.parse(page(18, 18, 0)), metrics.parse(page(118, 98, 40)))
    # an ensemble counts a failed step twice under OTHER: kept as Triton says, never summed into one figure
    assert d["models"]["policy"]["failures_by_reason"] == {"OTHER": 40} and "failures" not in d["models"]["policy"]
    assert d["wasted_encoder_requests"] == 20 and d["wasted_pct"] == pytest.approx(20.0)


def run_cli(argv, timeout=60):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start


def test_server_down_is_a_clear_error(tmp_path):
    port = free_port()
    proc, seconds = run_cli(
        ["-m", "loadtest.sweep", "--host", f"127.0.0.1:{port}", "--duration", "2", "--out", str(tmp_path)]
    )
    assert proc.returncode == 2 and seconds < 30
    assert proc.stderr.strip().startswith("loadtest: error: cannot reach the server") and "Traceback" not in proc.stderr


def test_wrong_model_is_a_clear_error(server, tmp_path):
    argv = ["-m", "loadtest.sweep", "--host", server.http_url, "--metrics-url", server.metrics_url, "--model", "nope",
            "--duration", "2", "--out", str(tmp_path)]  # fmt: skip
    proc, _ = run_cli(argv)
    assert proc.returncode == 2 and "model 'nope' is not ready" in proc.stderr and "Traceback" not in proc.stderr
    locust = [str(sweep.LOCUSTFILE), "--headless", "-u", "1", "-r", "1", "-t", "3s", "--host", server.http_url,
              "--vla-model", "nope"]  # fmt: skip
    proc, seconds = run_cli(["-m", "locust", "-f", *locust])
    assert proc.returncode == 2 and seconds < 30
    assert "loadtest: error: model 'nope'" in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr


def test_robot_mode_holds_its_rate(server, tmp_path):
    args = sweep.parse_args(
        ["--host", server.http_url, "--metrics-url", server.metrics_url, "--users", "2", "--duration", "4",
         "--mode", "robot", "--rate-hz", "5", "--out", str(tmp_path)]
    )  # fmt: skip
    (step,) = sweep.run(args)["results"]["sweep"]
    assert step["failures"] == 0 and 7.0 <= step["throughput"] <= 12.0, step["throughput"]  # 2 users x 5 Hz


def test_variant_without_a_step_under_the_slo_is_named():
    steps = {"slow": [{"users": 1, "throughput": 5.0, "p99_ms": 900.0, "failures": 0, "requests": 5, **_blank()}]}
    assert report.compare_table(steps, slo_ms=100) == "slow: no step with p99 <= 100 ms and no failures"


def test_a_one_model_policy_reports_its_own_batches_and_times():
    """A variant whose policy is one model has no step models on /metrics: the table shows the policy's."""
    step = {"users": 4, "throughput": 10.0, "p50_ms": 1, "p90_ms": 2, "p95_ms": 3, "p99_ms": 4, "failures": 0,
            "server": {"models": {"policy": {"avg_batch_size": 3.5, "queue_ms": 1.5, "compute_ms": 20.0}}}}  # fmt: skip
    row = report.row_of(step)
    assert row["avg_batch_encoder"] == row["avg_batch_decoder"] == 3.5
    assert row["queue_ms"] == 1.5 and row["compute_ms"] == 20.0
