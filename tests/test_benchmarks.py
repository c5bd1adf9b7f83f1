"""The fast GPU path on a machine without a GPU: CUDA graphs and compiling fall back, the compiled model's
parts are checked with TorchDynamo alone, and the peers benchmark runs (tiny)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlaserve import repository
from vlaserve.errors import VlaserveError
from vlaserve.manifest import read_manifest
from vlaserve.runtimes import load_runtime, python_module, random_input

ROOT = Path(__file__).resolve().parents[1]


def test_cuda_graphs_fall_back_to_the_module_on_cpu(tiny_repo):
    from vlaserve.client import make_request

    manifest = read_manifest(tiny_repo, "encoder")
    plain = load_runtime("torchscript", tiny_repo / "encoder" / "1", list(manifest.outputs), "cpu")
    graphed = load_runtime("torchscript", tiny_repo / "encoder" / "1", list(manifest.outputs), "cuda:0")
    why_not = graphed.capture_graphs([1, 2], manifest.inputs)
    assert "no CUDA device" in why_not and graphed.graphs is None and graphed.device == "cpu"
    request = make_request(2, 2, seed=3, vocab_size=manifest.vocab_size)
    inputs = {k: torch.from_numpy(request[k]) for k in manifest.inputs}
    for got, want in zip(graphed.run(inputs), plain.run(inputs)):
        assert torch.equal(got, want)


def _runtime(repo, name, device="cpu"):
    manifest = read_manifest(repo, name)
    return manifest, load_runtime("torchscript", repo / name / "1", list(manifest.outputs), device)


def test_compile_falls_back_to_the_torchscript_module_on_cpu(tiny_repo):
    manifest, runtime = _runtime(tiny_repo, "decoder", "cuda:0")
    why_not = runtime.compile(manifest)
    assert "no CUDA device" in why_not and runtime.compiled is None
    assert list(runtime.attention_choices()) == ["default", "efficient", "math"]


def test_each_layer_is_compiled_with_its_modules_inductor_settings_then_the_overrides(tiny_policy, monkeypatch):
    """The vision layers keep their natural strides (no stride padding: fc2's bias then stays in cuBLAS's
    epilogue), other layers take Inductor's defaults; overrides go over both, and a backend other than
    Inductor gets no settings at all."""
    from vlaserve.model.policy import Decoder, Encoder
    from vlaserve.runtimes import compile_layers

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw.get("options")) or fn)
    encoder, depth = Encoder(tiny_policy), len(tiny_policy.vision.blocks)
    compile_layers(torch, encoder)
    assert seen[:depth] == [{"comprehensive_padding": False}] * depth and set(map(str, seen[depth:])) == {"None"}
    seen.clear()
    compile_layers(torch, encoder, overrides={"shape_padding": False})
    assert seen[0] == {"comprehensive_padding": False, "shape_padding": False} and seen[-1] == {"shape_padding": False}
    seen.clear()
    compile_layers(torch, encoder, overrides={"comprehensive_padding": True})
    assert seen[0] == seen[-1] == {"comprehensive_padding": True}
    seen.clear()
    compile_layers(torch, Decoder(tiny_policy), backend="eager", overrides={"shape_padding": False})
    assert seen and set(map(str, seen)) == {"None"}


@pytest.mark.parametrize("name", ["encoder", "decoder"])
def test_compiled_path_computes_what_the_artifact_does(tiny_repo, name):
    """The Python model rebuilt around the artifact's weights, traced by TorchDynamo layer by layer (backend
    eager: Inductor itself is for the GPU), with SDPA and with the written-out attention."""
    manifest, runtime = _runtime(tiny_repo, name)
    assert runtime.compile(manifest, batch=2, backend="eager") == ""
    assert set(runtime.compiled_rel) == {"default", "compiled_math"}
    assert all(r < 1e-5 for r in runtime.compiled_rel.values()), runtime.compiled_rel
    assert set(runtime.attention_choices()) == {"default", "efficient", "math", "compiled_math"}
    _, plain = _runtime(tiny_repo, name)
    inputs = {k: random_input(torch, spec, 3, "cpu", manifest.vocab_size, seed=5) for k, spec in manifest.inputs.items()}  # fmt: skip
    for got, want in zip(runtime.run(inputs), plain.run(inputs)):
        assert got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-5)


def test_fp8_precision_computes_the_encoders_chosen_products_in_float8(tiny_repo):
    """precision: fp8 (the spec's, through the runtime): the encoder's gate/up products become float8 ones,
    close to the artifact but not equal; a step without fp8 products says so and stays as it is."""
    from vlaserve.model.fp8 import Fp8Linear

    manifest, runtime = _runtime(tiny_repo, "encoder")
    runtime.precision = "fp8"
    assert runtime.compile(manifest, batch=2, backend="eager") == ""
    layers = runtime.compiled.policy.prefix_layers
    assert all(isinstance(layer.gate_up_proj, Fp8Linear) for layer in layers)
    assert not isinstance(layers[0].qkv_proj, Fp8Linear)
    assert all(1e-4 < r < 1e-1 for r in runtime.compiled_rel.values()), runtime.compiled_rel  # rounded, not wrong
    manifest, runtime = _runtime(tiny_repo, "decoder")
    runtime.precision = "fp8"
    assert runtime.compile(manifest, batch=2, backend="eager") == ""
    assert runtime.precision is None and "Decoder has no fp8 products" in runtime.precision_note


def test_compile_refuses_a_model_that_differs_from_the_artifact(tiny_repo, monkeypatch):
    manifest, runtime = _runtime(tiny_repo, "encoder")
    state = runtime.module.state_dict()
    with pytest.raises(VlaserveError, match="1 missing"):
        python_module(torch, manifest, {k: v for k, v in state.items() if k != "policy.vision.norm.weight"})
    import vlaserve.model.policy

    monkeypatch.setattr(vlaserve.model.policy, "RMS_EPS", 0.5)  # as if the model code had changed since the export
    why_not = runtime.compile(manifest, backend="eager")
    assert "differs from the TorchScript artifact" in why_not and runtime.compiled is None


def test_compile_needs_torchscript():
    spec = repository.load_spec(ROOT / "model_repository" / "spec.yaml", "gpu")
    with pytest.raises(VlaserveError, match="compile"):
        spec.with_model("decoder", runtime="onnxruntime", cuda_graphs=False)
    spec = repository.load_spec(ROOT / "model_repository" / "spec.yaml", "gpu")
    assert repository.build_configs(spec)["decoder"].parameters["compile"].string_value == "true"
    naive = repository.build_configs(repository.load_spec(ROOT / "model_repository" / "spec.yaml", "gpu_naive"))
    assert "compile" not in naive["decoder"].parameters


def test_cuda_graphs_need_torchscript_and_buckets():
    for override, problem in (
        ({"runtime": "onnxruntime"}, "runtime torchscript"),
        ({"batch_buckets": []}, "batch_buckets"),
    ):
        spec = repository.load_spec(ROOT / "model_repository" / "spec.yaml", "gpu")
        with pytest.raises(VlaserveError, match=problem):
            spec.with_model("encoder", **override)
    spec = repository.load_spec(ROOT / "model_repository" / "spec.yaml", "gpu")
    config = repository.build_configs(spec)["encoder"]
    assert config.parameters["cuda_graphs"].string_value == "true"
    naive = repository.build_configs(repository.load_spec(ROOT / "model_repository" / "spec.yaml", "gpu_naive"))
    assert "cuda_graphs" not in naive["encoder"].parameters


def test_peers_benchmark_produces_table_and_results_on_cpu(tiny_repo, tmp_path, capsys):
    from benchmarks import peers

    out = tmp_path / "peers"
    # a generous SLO: on 2 shared cores a 3 s step's p99 varies; this checks that the figures exist
    argv = ["--preset", "tiny", "--dtype", "fp32", "--device", "cpu", "--repository", str(tiny_repo),
            "--users", "2", "--duration", "3", "--repeats", "5", "--buckets", "1,2", "--slo-ms", "2000",
            "--out", str(out)]  # fmt: skip
    assert peers.main(argv) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    results = doc["results"]
    assert list(results) == ["eager", "graphs", "compiled", "triton_naive", "triton_tuned", "triton_tuned_mps"]
    for peer, r in results.items():
        assert r["batch1"]["p50_ms"] > 0 and r["batch1"]["n"] == 5, peer
        assert f"\n{peer.rjust(16)}" in printed or f"\n{peer}" in printed
    assert "no CUDA device" in results["graphs"]["note"] and "no CUDA device" in results["compiled"]["note"]
    assert results["eager"]["vs_graphs_rel"] < 1e-5  # the served runtime computes what PyTorch does
    for peer in ("triton_naive", "triton_tuned", "triton_tuned_mps"):
        r = results[peer]
        assert r["rel_vs_inprocess_grpc"] < 1e-5 and r["rel_vs_inprocess_http"] < 1e-5, peer
        step = r["sweep"][0]
        assert step["requests"] > 0 and step["failures"] == 0, peer
        assert r["best"] is not None and r["best"]["throughput"] > 0, peer
    tuned = {s["model"]: s for s in results["triton_tuned"]["instances"]}
    assert tuned["encoder"]["cuda_graphs"] == [] and "no CUDA device" in tuned["encoder"]["cuda_graphs_note"]
    assert tuned["decoder"]["compiled"] is False and "no CUDA device" in tuned["decoder"]["compile_note"]
    naive = {s["model"]: s for s in results["triton_naive"]["instances"]}["encoder"]
    assert "cuda_graphs" not in naive and "compiled" not in naive
    assert "MPS percentages dropped" in results["triton_tuned_mps"]["note"]
    assert {c["target"].split(" ")[0] for c in doc["targets"]} == {"batch-1", "throughput", "Triton"}
    assert "target" in printed and "results.json" in printed
    assert np.load(out / "inprocess_actions.npz")["graphs"].shape == (1, 50, 32)


@pytest.mark.parametrize("failure", ["wrong", "raises"])
@pytest.mark.parametrize("choice", ["fused", "triton_attention"])
def test_a_failing_triton_choice_drops_only_itself(tiny_repo, monkeypatch, failure, choice):
    """The decoder's Triton kernels are optional graph choices: wrong answers or a compile error drop that
    choice alone (named in fused_note), the other stays offered, and the compiled decoder still serves."""
    import contextlib

    from vlaserve.model.kernels import _SCALED, _scaled_weights

    manifest, runtime = _runtime(tiny_repo, "decoder")
    runtime.fused_kernels = True
    offered = runtime._compiled_choices
    other = {"fused": "triton_attention", "triton_attention": "fused"}[choice]

    @contextlib.contextmanager
    def broken(module):
        if choice == "fused":
            _scaled_weights(module.policy)  # as the real fused decoder: its weight copies made on entry
        if failure == "raises":
            raise RuntimeError("Triton: out of resource")  # as a compile error on another GPU would
        module.forward = lambda *inputs: torch.zeros(len(inputs[0]), 50, 32)
        try:
            yield
        finally:
            del module.forward

    def choices(backend, module):
        # what an inductor runtime offers (this test compiles with "eager"), the one choice broken
        return {**offered(backend, module), other: contextlib.nullcontext, choice: lambda: broken(module)}

    monkeypatch.setattr(runtime, "_compiled_choices", choices)
    assert runtime.compile(manifest, batch=2, backend="eager") == ""
    assert runtime.compiled is not None and runtime.dropped == {choice}
    assert runtime.fused_note.startswith(f"{choice} dropped: " + ("RuntimeError" if failure == "raises" else "rel"))
    assert {"default", "compiled_math", other} <= set(runtime.compiled_rel)  # (and the wrong one's error)
    monkeypatch.setattr(runtime, "_compiled_choices", offered)
    runtime.compile_backend = "inductor"  # as served: the Triton choices offered, less the dropped one
    assert other in runtime.attention_choices() and choice not in runtime.attention_choices()
    if choice == "fused":
        assert runtime.compiled.policy.expert_layers not in _SCALED  # no graph will use the weight copies: gone


def test_decoder_kernel_grids_cover_the_defaults_and_fit_the_gpu():
    """benchmarks/decoder_kernels.py's launch settings: every batch-1 default is among them (the sweep can
    confirm or beat it), the norm kinds take no K split, above 64 rows the products' row blocks of 64 and 128
    are both tried, and every setting's pipeline buffers (one row block and the weight tiles per stage, bf16)
    fit in the H100/H200's 227 KB of shared memory per block."""
    from benchmarks.decoder_kernels import settings
    from vlaserve.model.kernels import TILES_BY_ROWS, _check_tiles
    from vlaserve.model.presets import get_preset

    cfg = get_preset("pi0", 2)
    grids, defaults = settings(cfg, 51), TILES_BY_ROWS[0][1]
    for kind in ("qkv", "out", "geglu", "down"):
        layout = {"geglu_layout": "two"} if kind == "geglu" else {}  # gate/up: each layout of the weight too
        assert {kind: tuple(defaults[kind]), **layout} in grids[kind], kind
        assert all("block_m" not in tiles for tiles in grids[kind]), kind  # 51 rows: one block of 64
    assert {t["geglu_layout"] for t in grids["geglu"]} == {"two", "interleaved"}
    assert any(t["attention"] == tuple(defaults["attention"]) for t in grids["attention"])
    many = settings(cfg, 16 * 51)
    for kind in ("qkv", "out", "geglu", "down"):
        assert {t["block_m"][kind] for t in many[kind]} == {64, 128}, kind
        for tiles in many[kind]:
            _check_tiles(tiles)
            bn, bk, _, stages, *split = tiles[kind]
            two = kind in ("qkv", "geglu")
            assert (not split) == two, tiles
            rows = tiles["block_m"][kind]
            assert stages * (rows * bk + (2 if two else 1) * bn * bk) * 2 <= 227 * 1024, tiles


def test_decoder_kernels_command_line_runs_a_b_a_with_splits_and_tiles(capsys):
    """decoder_kernels' whole-decoder runs: each way of --merge with each number of --splits, a setting named
    again run again under a name of its own (A, B, A), and --tiles parsed into launch settings; bad values
    refused by name."""
    from benchmarks.decoder_kernels import parse_args, run_key

    args = parse_args(["--out", "x.json", "--kinds", "", "--merge", "last,kernel,last", "--splits", "0,3",
                       "--tiles", '{"out": [32, 16, 4, 2, 8], "splits": 2}'])  # fmt: skip
    assert args.kinds == [] and args.merges == ["last", "kernel", "last"] and args.key_splits == [0, 3]
    assert args.more_tiles == [{"out": (32, 16, 4, 2, 8), "splits": 2}]
    assert parse_args(["--out", "x.json"]).key_splits == [None]  # the settings' own
    taken = {}
    for merge in args.merges:
        for splits in args.key_splits:
            taken[run_key("defaults", "off", "off", merge, splits, taken)] = merge
    assert list(taken) == ["defaults, splits 0", "defaults, splits 3", "defaults, merge kernel, splits 0",
                           "defaults, merge kernel, splits 3", "defaults, splits 0 again", "defaults, splits 3 again"]  # fmt: skip
    assert run_key("best", "launch", "next", "last", None, {}) == "best, pdl launch, ahead next"
    for bad, message in ((["--splits", "two"], "--splits"), (["--splits", "-1"], "--splits"),
                         (["--tiles", "[1, 2]"], "--tiles"), (["--merge", "first"], "--merge")):  # fmt: skip
        with pytest.raises(SystemExit):
            parse_args(["--out", "x.json", *bad])
        assert f"{message}:" in capsys.readouterr().err


BENCH_CHECK = """
import dataclasses, json
from benchmarks import decoder_kernels as dk
from vlaserve.model.policy import build_policy
from vlaserve.model.presets import get_preset

cfg = get_preset("tiny", 2)
cfg = dataclasses.replace(cfg, prefix=dataclasses.replace(cfg.prefix, head_dim=32),
                          expert=dataclasses.replace(cfg.expert, head_dim=32))
policy = build_policy(cfg)
bench = dk.Bench(policy, 1)
rel = {}
for kind, tiles in (("out", {"out": (16, 16, 4, 1, 3)}), ("out", {"out": (16, 16, 4, 1, 2)}),
                    ("down", {"down": (16, 16, 4, 1, 2)}), ("qkv", {"qkv": (16, 16, 4, 1)}),
                    ("attention", {"attention": (16, 16, 4, 1), "splits": 3})):
    out = bench.run_once(kind, {**bench.defaults, **tiles})
    rel[f"{kind} {tiles}"] = max(dk.compare(o, r)["rel"] for o, r in zip(out, bench.reference[kind]))
shapes = {kind: [n, k] == list(getattr(policy.expert_layers[0], name).weight.shape)
          for kind, (name, n, k) in dk.products(cfg).items()}
print(json.dumps({"rel": rel, "shapes": shapes}))
"""


def test_decoder_kernels_bench_runs_settings_one_after_another_in_the_interpreter():
    """benchmarks/decoder_kernels.py's Bench on a small model in Triton's CPU interpreter: settings that split
    K run one after another on the shared workspaces (restored between them) and agree with the defaults, and
    its table of products names each weight with its shape."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "VLASERVE_BENCH_DEVICE": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", BENCH_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(r < 1e-5 for r in result["rel"].values()), result
    assert all(result["shapes"].values()), result


TMA_CHECK = """
import json
from benchmarks import tma_probe as t
w = t.weights_for(64, 128, 1)
rel = {f"{loads} {rows} {s}": t.run(loads, w, rows, s, timed=False)[0]
       for loads in t.LOADS for rows in (51, 204) for s in [(32, 64, 4, 3, 1), (32, 32, 4, 3, 2), (64, 32, 4, 3, 4)]}
jobs = t.jobs_for({"qkv": (2560, 1024), "geglu": (8192, 1024)}, [1])
fits = [t.fits((32, 64, 4, 4, 1), 2560, 1024, 51), t.fits((128, 256, 4, 4, 8), 2560, 1024, 51),
        t.fits((32, 64, 4, 4, 1), 2560, 1000, 51), t.fits((128, 64, 4, 4, 1), 1024, 4096, 51)]
print(json.dumps({"rel": rel, "jobs": len(jobs), "fits": fits}))
"""


def test_tma_probe_products_agree_with_torch_for_both_loads_in_the_interpreter():
    """benchmarks/tma_probe.py in Triton's CPU interpreter: the product with pointer loads and with tensor
    descriptors, whole or split over K, over 51 rows in a block of 64 and over 204 in four (the rows past the
    end masked or zero-filled), is PyTorch's product. It tries only settings that tile the weight whole with
    64 to 1,056 programs. Both kernels compile for sm_90, the descriptors' loads to the copy engine's."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "VLASERVE_BENCH_DEVICE": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", TMA_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["rel"]) == 12 and all(r < 1e-5 for r in result["rel"].values()), result
    # K not split into whole blocks (1024 / (8 x 256)), K not a multiple of BLOCK_K, 8 programs only
    assert result["jobs"] > 0 and result["fits"] == [True, False, False, False], result
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from benchmarks import tma_probe

    sizes = {"SPLITS": 2, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "STAGES": 4}
    common = {"out_ptr": "*fp32", "M": "i32", "N": "i32", **{k: "constexpr" for k in sizes}}
    for fn, operands in (
        (tma_probe._pointer_product, {"x_ptr": "*bf16", "w_ptr": "*bf16", "K": "i32"}),
        (tma_probe._descriptor_product, {"x_desc": "tensordesc<bf16[64, 128]>", "w_desc": "tensordesc<bf16[64, 128]>"}),
    ):  # the descriptors' loads are the copy engine's (cp.async.bulk.tensor) on sm_90, the pointers' are not
        signature = {p.name: {**operands, **common, "k_per_split": "i32"}[p.name] for p in fn.params}
        source = ASTSource(fn, signature, sizes)
        ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
        assert ("cp.async.bulk.tensor" in ptx) == (fn is tma_probe._descriptor_product), fn.__name__


def test_triton_floor_serves_a_model_that_does_no_work_over_each_mode(tmp_path, capsys):
    """benchmarks/triton_floor.py: the real tritonserver, a Python-backend model of the policy's interface
    that answers zeros, a few requests per mode; each mode's row has the client's and Triton's figures, and
    the shared-memory mode leaves no region behind."""
    import json
    import os
    from pathlib import Path

    from benchmarks.triton_floor import MODES, main

    out = tmp_path / "floor.json"
    assert main(["--requests", "5", "--read", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == list(MODES)
    for row in rows:
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["infer"] > 0
    assert not list(Path("/dev/shm").glob(f"vlaserve_client_{os.getpid()}_*"))
    assert "| grpc_shm |" in capsys.readouterr().out


def test_triton_floor_model_spins_as_long_as_it_is_told(tmp_path, capsys, monkeypatch):
    """With --work-ms each execute takes at least that long, in Triton's infer figure and at the client, and
    --busy-cpus keeps that many CPUs busy through the requests; a setting it cannot take is a command-line
    error before any server starts."""
    import json

    import benchmarks.triton_floor as floor

    kept_busy = []
    real = floor.busy_cpus

    def recording(count):
        kept_busy.append(count)
        return real(count)

    monkeypatch.setattr(floor, "busy_cpus", recording)
    out = tmp_path / "floor.json"
    argv = ["--modes", "grpc", "--requests", "3", "--work-ms", "25", "--busy-cpus", "1", "--out", str(out)]
    assert floor.main(argv) == 0
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert result["work_ms"] == 25.0 and row["infer"] >= 25.0 and row["p50_ms"] >= 25.0
    assert result["busy_cpus"] == 1 and kept_busy == [1]
    assert "spins 25 ms (reads nothing, 1 CPUs kept busy)" in capsys.readouterr().out
    for bad, why in (
        (["--work-ms", "-1"], "--work-ms: -1.0; 0 to 1000"),
        (["--busy-cpus", "-1"], "--busy-cpus: -1; 0 to"),
    ):
        with pytest.raises(SystemExit):
            floor.main([*bad, "--out", str(out)])
        assert why in capsys.readouterr().err


def test_triton_floor_model_spins_rather_than_sleeps(tmp_path, monkeypatch):
    """The model the floor serves waits as the runner does in a CUDA stream's synchronize: on the CPU, so that
    its execute's CPU time is about its wall time (a sleep would take none)."""
    import importlib.util
    import time
    import types

    from benchmarks.triton_floor import write_repository

    utils = types.ModuleType("triton_python_backend_utils")
    utils.Tensor = lambda name, array: (name, array)
    utils.InferenceResponse = lambda tensors: tensors
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    repo = write_repository(tmp_path / "repo", views=2, read=False, work_ms=50.0)
    spec = importlib.util.spec_from_file_location("floor_model", next(repo.glob("*/1/model.py")))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    wall, cpu = time.perf_counter(), time.process_time()
    (response,) = module.TritonPythonModel().execute([object()])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert wall >= 0.05 and cpu >= 0.8 * wall
    assert response[0][1].shape[0] == 1 and not response[0][1].any()


def _spinners_of(parent: int) -> list[tuple[int, int]]:
    """Live (not zombie) processes of ``busy_cpus``'s spinner whose parent is ``parent``, and their nice."""
    from benchmarks.triton_floor import SPINNER

    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == parent and stat[0] != "Z" and SPINNER.encode() in cmdline:
            found.append((int(pid), int(stat[16])))
    return found


def _poll(check, seconds: float = 10.0):
    import time

    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)
    return check()


def test_triton_floor_keeps_cpus_busy_only_while_it_measures():
    """--busy-cpus: that many spinning processes at nice 19 while the block runs, none left after it; and a
    benchmark killed outright leaves none spinning either (each stops once its parent is gone)."""
    import signal

    from benchmarks.triton_floor import busy_cpus

    with busy_cpus(2):
        assert _poll(lambda: len(_spinners_of(os.getpid())) == 2 and all(n == 19 for _, n in _spinners_of(os.getpid())))
    assert _spinners_of(os.getpid()) == []
    script = "import time\nfrom benchmarks.triton_floor import busy_cpus\nwith busy_cpus(1):\n    print('in', flush=True)\n    time.sleep(60)\n"
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "in"
        assert _poll(lambda: len(_spinners_of(child.pid)) == 1)
        ((spinner, _),) = _spinners_of(child.pid)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()

    def stopped() -> bool:
        try:
            return Path(f"/proc/{spinner}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    assert _poll(stopped)


def test_served_breakdown_takes_the_instances_phases_per_model_and_execute():
    from collections import Counter

    from benchmarks.served_breakdown import execute_phases

    before = {"encoder": Counter(count=2, read_ms=1.0, launch_ms=4.0)}
    after = {
        "encoder": Counter(count=6, read_ms=3.0, launch_ms=12.0),
        "decoder": Counter(count=4, read_ms=2.0, launch_ms=8.0),  # none before: counted from zero
        "policy": Counter(count=0, read_ms=0.0, launch_ms=0.0),
    }
    assert execute_phases(before, after) == {
        "encoder": {"executes": 4, "read_ms": 0.5, "launch_ms": 2.0},
        "decoder": {"executes": 4, "read_ms": 0.5, "launch_ms": 2.0},
        "policy": {"executes": 0, "read_ms": None, "launch_ms": None},
    }


def test_served_breakdown_samples_the_gpu_clock_through_a_load_phase(tmp_path, monkeypatch):
    """GpuClocks queries nvidia-smi for as long as the block lasts and summarizes what it printed (here a
    stand-in on PATH that prints a line and an "[N/A]" line); it asks about the GPU that CUDA device 0 is
    under CUDA_VISIBLE_DEVICES, or the one it is given; without nvidia-smi the summary is empty."""
    import time

    from benchmarks.served_breakdown import GpuClocks, clock_summary, visible_gpu

    assert clock_summary(["1980, 650.5", "[N/A], [N/A]", "1755, 700.0", "1830, 690.2"]) == {
        "samples": 3, "sm_mhz_median": 1830.0, "sm_mhz_min": 1755.0, "power_w_median": 690.2, "power_w_max": 700.0,
    }  # fmt: skip
    fake = tmp_path / "nvidia-smi"
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\necho "1980, 650.5"\necho "[N/A], [N/A]"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")  # the server's device 0 is nvidia-smi's GPU 3
    with GpuClocks(interval_s=0.05) as clocks:
        time.sleep(0.5)
    summary = clocks.summary()
    assert summary["samples"] >= 3 and summary["sm_mhz_median"] == 1980.0 and summary["power_w_max"] == 650.5
    assert summary["gpu"] == "3"
    assert (tmp_path / "args").read_text().split()[:3] == ["-i", "3", "--query-gpu=clocks.sm,power.draw"]
    with GpuClocks(interval_s=0.05, gpu="GPU-1234") as clocks:
        time.sleep(0.1)
    assert (tmp_path / "args").read_text().split()[:2] == ["-i", "GPU-1234"]
    assert visible_gpu(1) == "1"
    with pytest.raises(ValueError, match="CUDA device 2"):
        visible_gpu(2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpu() == "0"
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    with GpuClocks() as clocks:
        pass
    assert clocks.summary() == {}


def test_profile_runtime_sorts_kernels_into_kinds_by_name():
    """cuBLAS's products, attention kernels (PyTorch's flash and cuDNN's, the project's own), Inductor's
    reductions and pointwise kernels, copies, the project's other Triton kernels; PyTorch's elementwise
    kernels (named ``..._kernel`` too) are "other". The sums keep calls and ms per kind, the largest first."""
    from benchmarks.profile_runtime import by_kind, kernel_kind

    assert kernel_kind("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN") == "product"
    assert kernel_kind("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<72>>") == "attention"
    assert kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert kernel_kind("_attention_kernel") == "attention"
    assert kernel_kind("triton_red_fused_add_mean_mul_pow_rsqrt_0") == "inductor reduction"
    assert kernel_kind("triton_poi_fused__unsafe_view_gelu_mul_split_1") == "inductor pointwise"
    assert kernel_kind("Memcpy HtoD (Pageable -> Device)") == "copy"
    assert kernel_kind("_norm_geglu_kernel") == "project triton"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>") == "other"
    kinds = by_kind({"nvjet_a": [18, 1.5], "nvjet_b": [27, 0.75], "triton_poi_fused_add_0": [45, 0.5]})
    assert kinds == {"product": [45, 2.25], "inductor pointwise": [45, 0.5]} and list(kinds) == [
        "product",
        "inductor pointwise",
    ]


def test_every_benchmark_imports_as_a_module_of_the_package():
    """Each script runs as ``python -m benchmarks.<name>`` (as the docs give them): none imports another by
    its file name, which works only when run from that folder."""
    names = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")
    code = "import importlib, sys\nfor n in sys.argv[1:]: importlib.import_module('benchmarks.' + n)"
    done = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "compile_probe" in names and len(names) > 20


def test_encoder_probe_writes_the_siglip_layer_as_the_model_does_and_with_its_biases_added_after():
    """The probe's SigLIP layer is SiglipBlock's (bit for bit, eager), and its "bias after" form computes the
    same layer (float32: the products' sums in another order only)."""
    from benchmarks.encoder_attention_probe import bias_after, siglip_layer
    from vlaserve.model.policy import SiglipBlock
    from vlaserve.model.presets import get_preset

    torch.manual_seed(0)
    block = SiglipBlock(get_preset("tiny").vision).eval()
    for p in block.parameters():  # biases and norms that count (the defaults are zeros and ones)
        p.data.normal_(0, p.shape[-1] ** -0.5)
    x = torch.randn(2, 16, block.qkv.in_features)
    with torch.no_grad():
        reference = block(x)
        assert torch.equal(siglip_layer(block, x), reference)
        after = siglip_layer(block, x, bias_after)
    torch.testing.assert_close(after, reference, rtol=1e-5, atol=1e-5)


def test_encoder_probe_reads_which_library_call_each_product_becomes():
    """The probe's library_calls reads Inductor's generated code: the compiled layer's four products are
    cuBLAS calls that take their bias (addmm), and the "bias after" form's are bare products (mm)."""
    from benchmarks.encoder_attention_probe import library_calls, siglip_bias_after
    from vlaserve.model.policy import SiglipBlock
    from vlaserve.model.presets import get_preset

    torch._dynamo.reset()
    block = SiglipBlock(get_preset("tiny").vision).eval()
    x = torch.randn(2, 16, block.qkv.in_features)
    served = [c for c in library_calls(torch.compile(block.forward, dynamic=False), x) if "extern_kernels." in c]
    after = [c for c in library_calls(siglip_bias_after(block), x) if "extern_kernels." in c]
    assert [c.split("(")[0] for c in served] == ["extern_kernels.addmm"] * 4, served
    assert [c.split("(")[0] for c in after] == ["extern_kernels.mm"] * 4, after


def test_sustained_clock_reads_inductor_settings_and_refuses_others():
    from benchmarks.sustained_clock import inductor_setting

    assert inductor_setting("comprehensive_padding=True") == ("comprehensive_padding", True)
    assert inductor_setting("padding_alignment_bytes=64") == ("padding_alignment_bytes", 64)
    for bad in ("comprehensive_padding", "=True", "shape_padding=yes", "x=1.5"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            inductor_setting(bad)


def test_sustained_clock_takes_each_windows_median_from_its_own_replays():
    """A replay belongs to the window its start falls in (start inclusive, end exclusive); an empty window is
    None, not 0."""
    from benchmarks.sustained_clock import median_between

    load = [(0.0, 68.0), (0.5, 70.0), (0.99, 90.0), (1.0, 75.0), (9.9, 76.0), (10.0, 77.0)]
    assert median_between(load, 0, 1) == 70.0
    assert median_between(load, 1, 10) == 75.5
    assert median_between(load, 10, 15) == 77.0
    assert median_between(load, 2, 3) is None


def test_sustained_clock_takes_mean_power_between_the_energy_counters_own_steps():
    """The window's power is the energy between the counter's first and last steps inside it over the time
    between them (not the window's length: the counter moves only every 20-100 ms); fewer than two steps
    inside give None. Without NVML (here a library that does not exist) the counter is unavailable, its
    block starts no thread and every figure is None."""
    from benchmarks.sustained_clock import EnergyCounter, mean_watts

    steps = [(9.0, 100.0), (10.05, 170.0), (12.05, 1570.0), (15.05, 3670.0), (15.2, 3775.0)]
    assert mean_watts(steps, 10.0, 15.1) == {"watts": 700.0, "seconds": 5.0, "steps": 3}
    assert mean_watts(steps, 10.0, 12.0) is None and mean_watts([], 0, 1) is None
    counter = EnergyCounter("GPU-0", libraries=("libnvidia-ml-missing.so.0",))
    with counter:
        assert counter.thread is None
    assert not counter.available and counter.joules() is None and counter.limit_watts() is None
    assert counter.mean_watts(0, 1e9) is None


def test_sustained_clock_sets_the_pipelines_time_against_its_energy_at_the_power_limit():
    """Per bucket with both models: the graphs one after the other give batch / (encoder + decoder ms); the
    power limit over the summed joules per answer gives the most any overlap could; a bucket with one model,
    or rows without energy, give no power figure."""
    from benchmarks.sustained_clock import pipeline_ceilings

    def row(model, batch, ms, j=None):
        return {"model": model, "batch": batch, "last_5s_ms": ms,
                "energy": {"limit_w": 700.0, **({"j_per_answer": j} if j else {})}}  # fmt: skip

    rows = [row("encoder", 16, 76.0, 3.25), row("decoder", 16, 21.0, 0.875), row("encoder", 1, 6.0)]
    assert pipeline_ceilings(rows) == [
        {"batch": 16, "graphs_ms": 97.0, "in_turn_per_s": 164.9, "j_per_answer": 4.125, "limit_w": 700.0,
         "power_limit_per_s": 169.7},
    ]  # fmt: skip
    assert pipeline_ceilings(rows + [row("decoder", 1, 7.5)])[0] == {
        "batch": 1,
        "graphs_ms": 13.5,
        "in_turn_per_s": 74.1,
    }


def test_sustained_clock_finds_a_step_in_a_one_model_repository(tiny_repo, tmp_path):
    """A step of the exported repository is its own model; in a one-model variant's repository (here
    gpu_one_model_fp8's) it is the policy's step, with the parameters the policy serves it with (fp8)."""
    from benchmarks.sustained_clock import served_step
    from vlaserve import repository

    folder, params = served_step(tiny_repo, "encoder")
    assert folder == tiny_repo / "encoder" / "1" and params.precision is None
    out = tmp_path / "fp8"
    argv = ["--repository", str(tiny_repo), "--variant", "gpu_one_model_fp8", "--out", str(out), "--gpus", "1"]
    assert repository.main(argv) == 0
    folder, params = served_step(out, "encoder")
    assert folder == out / "policy" / "1" / "encoder" and (folder / "manifest.json").is_file()
    assert params.precision == "fp8" and params.compile and 16 in params.batch_buckets
    assert served_step(out, "decoder")[1].fused_kernels
    with pytest.raises(SystemExit, match="no model 'vision'"):
        served_step(out, "vision")


def test_sustained_clock_refuses_to_time_a_model_whose_answers_are_wrong(tiny_repo):
    """Its golden check passes the artifact as exported, and ends the run (before any timing) when the same
    runtime answers off by 10 %."""
    from benchmarks.sustained_clock import checked
    from vlaserve.manifest import read_manifest
    from vlaserve.runtimes import load_runtime

    manifest = read_manifest(tiny_repo, "encoder")
    runtime = load_runtime("torchscript", tiny_repo / "encoder" / "1", list(manifest.outputs), "cpu")
    assert checked("encoder", runtime, tiny_repo / "encoder" / "1", 2, manifest.dtype)["worst"] < 1e-4
    right = runtime.run
    runtime.run = lambda inputs: [t * 1.1 if t.is_floating_point() else t for t in right(inputs)]
    with pytest.raises(SystemExit, match="encoder: wrong answers through the graph"):
        checked("encoder", runtime, tiny_repo / "encoder" / "1", 2, manifest.dtype)
