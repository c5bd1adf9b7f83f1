"""``python -m vlaserve.guard``: the HTTP front of the server, which checks every inference request before Triton
parses it.

Why: tritonserver 2.51 allocates what a JSON inference request's ``shape`` claims before it checks the data,
so one 128-byte request claiming ``[100000, 2, 224, 224, 3]`` made it abort (``std::bad_alloc``), with no
credentials needed. gRPC rejects the same request safely. So Triton's own HTTP listens on loopback only,
and this guard listens where clients connect. It forwards every request, and before forwarding an
inference request it checks, against the model's config, that:

- the model is one clients may call (``policy``; the ``encoder`` and ``decoder`` are internal);
- every input is one the model has, with its datatype and a shape of [batch 1..max_batch_size, *its dims],
  and none is missing (only ``noise`` may be left out);
- binary data sizes (the binary tensor extension) add up to what the shapes and datatypes need and to the
  body that came.

A request that fails gets 400 with one line naming the tensor and what was expected; Triton never sees it.
The launcher (``vlaserve.server``) starts and stops the guard with the server; ``--no-http-guard`` there
serves Triton's HTTP directly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import signal
import sys
import urllib.request

from vlaserve import interface as io

INFER_PATH = re.compile(r"^/v2/models/(?P<model>[^/]+)(/versions/[^/]+)?/infer$")
CLIENT_MODELS = (io.POLICY,)
BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2, "BF16": 2, "INT32": 4, "UINT32": 4,
         "FP32": 4, "INT64": 8, "UINT64": 8, "FP64": 8}  # fmt: skip
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade", "te", "trailer"}
MAX_BODY = 256 * 2**20


def model_inputs(config: dict) -> tuple[dict, int]:
    """({input name: (datatype, dims)}, max_batch_size) from a model config as Triton's HTTP API gives it."""
    inputs = {i["name"]: (i["data_type"].removeprefix("TYPE_"), [int(d) for d in i["dims"]]) for i in config["input"]}
    return inputs, int(config.get("max_batch_size", 0))


def check_request(model: str, body: bytes, headers, configs: dict) -> str:
    """Why this inference request must not reach Triton, or "" when it may."""
    if model not in CLIENT_MODELS:
        return f"model {model!r}: not served to clients (call {' or '.join(CLIENT_MODELS)})"
    if model not in configs:
        return f"model {model!r}: unknown"
    if headers.get("Content-Encoding", "identity").lower() != "identity":
        return "Content-Encoding: compressed inference requests are not accepted here"
    header_length = headers.get("Inference-Header-Content-Length")
    try:
        json_length = int(header_length) if header_length is not None else len(body)
        if not 0 < json_length <= len(body):
            raise ValueError
        request = json.loads(body[:json_length])
        tensors = request["inputs"]
        if not isinstance(tensors, list):
            raise ValueError
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: JSON nested too deep to parse
        return "body: expected a JSON inference request with an 'inputs' list (KServe v2 protocol)"
    expected, max_batch = configs[model]
    binary_total = 0
    for tensor in tensors:
        name = tensor.get("name") if isinstance(tensor, dict) else None
        if name not in expected:
            return f"input {name!r}: not an input of {model} (expected one of {sorted(expected)})"
        datatype, dims = expected[name]
        if tensor.get("datatype") != datatype:
            return f"input {name}: datatype {tensor.get('datatype')!r}, expected {datatype}"
        shape = tensor.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) != len(dims) + 1
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or not 1 <= shape[0] <= max_batch
            or shape[1:] != dims
        ):
            return f"input {name}: shape {shape!r}, expected [batch 1..{max_batch}, {', '.join(map(str, dims))}]"
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            need = math.prod(shape) * BYTES[datatype]
            if size != need:
                return f"input {name}: binary_data_size {size!r}, expected {need} for shape {shape} of {datatype}"
            binary_total += size
    if binary_total and json_length + binary_total != len(body):
        return f"body: {len(body) - json_length} bytes of binary data, the inputs declare {binary_total}"
    missing = [n for n in expected if n != io.NOISE and n not in {t["name"] for t in tensors}]
    if missing:
        required = [n for n in expected if n != io.NOISE]
        return f"input {missing[0]}: missing (every input of {required} is needed; {io.NOISE} may be left out)"
    return ""


def fetch_configs(upstream: str, timeout: float = 10.0) -> dict:
    """The client models' inputs, read from the running Triton behind the guard."""
    configs = {}
    for model in CLIENT_MODELS:
        with urllib.request.urlopen(f"http://{upstream}/v2/models/{model}/config", timeout=timeout) as resp:
            configs[model] = model_inputs(json.loads(resp.read()))
    return configs


async def serve(listen_host: str, listen_port: int, upstream: str, configs: dict, drain_s: float = 30.0) -> None:
    from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

    session = ClientSession(f"http://{upstream}", connector=TCPConnector(limit=0),
                            timeout=ClientTimeout(total=None), auto_decompress=False)  # fmt: skip

    stopping = asyncio.Event()

    async def forward(request: web.Request) -> web.StreamResponse:
        if stopping.is_set():  # also on kept-alive connections: retryable, and the client reconnects elsewhere
            return web.json_response({"error": "vlaserve guard: the server is stopping; retry"}, status=503,
                                     headers={"Connection": "close", "Retry-After": "1"})  # fmt: skip
        body = await request.read()
        match = INFER_PATH.match(request.path)
        if match and request.method == "POST":
            problem = check_request(match["model"], body, request.headers, configs)
            if problem:
                return web.json_response({"error": f"vlaserve guard: {problem}"}, status=400)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with session.request(request.method, request.rel_url, headers=headers, data=body) as upstream_resp:
            data = await upstream_resp.read()
            out = {k: v for k, v in upstream_resp.headers.items() if k.lower() not in HOP_BY_HOP}
            return web.Response(status=upstream_resp.status, body=data, headers=out)

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_route("*", "/{tail:.*}", forward)
    # On SIGTERM: answer new requests 503 (retryable), answer the requests already in flight (they need
    # Triton, which the launcher stops only after the guard has exited), then exit.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=drain_s)
    await runner.setup()
    await web.TCPSite(runner, listen_host, listen_port).start()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    print(f"guard: ready on {listen_host}:{listen_port}, upstream {upstream}", flush=True)
    try:
        await stopping.wait()
        print("guard: stopping; answering the requests in flight", flush=True)
    finally:
        await runner.cleanup()
        await session.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlaserve.guard", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="host:port clients connect to")
    parser.add_argument("--upstream", required=True, help="host:port of Triton's own HTTP (loopback)")
    parser.add_argument(
        "--drain-seconds", type=float, default=30.0, help="on SIGTERM, the longest wait for requests in flight"
    )
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    try:
        configs = fetch_configs(args.upstream)
    except OSError as exc:
        print(f"guard: error: cannot read the model configs from {args.upstream}: {exc}", file=sys.stderr)
        return 1
    try:
        asyncio.run(serve(host, int(port), args.upstream, configs, args.drain_seconds))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
