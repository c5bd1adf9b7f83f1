"""Requests a hostile or unlucky client sends: shared by the tests and ``make reliability``.

Each HTTP case is (name, body, headers, what the refusal must say); each gRPC case is a
``ModelInferRequest``. None of them may take the server down, and each must be answered with the
client's fault (HTTP 4xx, gRPC INVALID_ARGUMENT or another non-OK status), never a success.
"""

from __future__ import annotations

import json

# Shapes that lie about the data that follows. The first made tritonserver 2.51 allocate what it
# claims (2.9 TB) before checking the data, and abort: a 128-byte request with no credentials.
LYING_SHAPES = [[100000, 2, 224, 224, 3], [2**40, 2, 224, 224, 3], [1, 2, 224, 224, 3, 1000000], [-1, 2, 224, 224, 3],
                [1, 2, 224, 224], ["1", 2, 224, 224, 3], [1, 20000, 224, 224, 3]]  # fmt: skip
CRASH_BODY = json.dumps(
    {"inputs": [{"name": "images", "shape": LYING_SHAPES[0], "datatype": "UINT8", "data": list(range(10))}]}
)


def lying_http_bodies() -> list[tuple[str, str, dict, str]]:
    """The crash request and its family, and bodies that lie about their binary data."""
    cases = [
        (f"shape {s}", json.dumps({"inputs": [{"name": "images", "shape": s, "datatype": "UINT8",
                                                "data": list(range(10))}]}), {}, "input images: shape")
        for s in LYING_SHAPES
    ]  # fmt: skip
    header = json.dumps(
        {"inputs": [{"name": "state", "shape": [1, 32], "datatype": "FP32", "parameters": {"binary_data_size": 128}}]}
    )
    cases += [
        ("not JSON", "not json", {}, "body: expected"),
        ("inputs not a list", '{"inputs": 7}', {}, "body: expected"),
        # declares 128 bytes of binary data and sends none
        ("binary data missing", header, {"Inference-Header-Content-Length": str(len(header))}, "bytes of binary data"),
    ]
    return cases


def malformed_http_bodies() -> list[tuple[str, bytes, dict]]:
    """Bodies that are wrong in the ordinary ways (the guard or Triton answers each with a 4xx)."""
    state = {"name": "state", "shape": [1, 32], "datatype": "FP32", "data": [0.0] * 32}
    bodies = {
        "empty body": b"",
        "JSON null": b"null",
        "JSON list": b"[]",
        "no inputs": b"{}",
        "empty inputs": b'{"inputs": []}',
        "input not an object": b'{"inputs": [1]}',
        "input without name": json.dumps({"inputs": [{k: v for k, v in state.items() if k != "name"}]}).encode(),
        "unknown input": json.dumps({"inputs": [{**state, "name": "nope"}]}).encode(),
        "unknown datatype": json.dumps({"inputs": [{**state, "datatype": "FP99"}]}).encode(),
        "wrong datatype": json.dumps({"inputs": [{**state, "datatype": "INT64"}]}).encode(),
        "shape not a list": json.dumps({"inputs": [{**state, "shape": "1,32"}]}).encode(),
        "float dims": json.dumps({"inputs": [{**state, "shape": [1.5, 32]}]}).encode(),
        "too little data": json.dumps({"inputs": [{**state, "data": [0.0] * 3}]}).encode(),
        "too much data": json.dumps({"inputs": [{**state, "data": [0.0] * 3000}]}).encode(),
        "strings as data": json.dumps({"inputs": [{**state, "data": ["x"] * 32}]}).encode(),
        "nested junk": json.dumps({"inputs": [{**state, "data": [[[[]]]]}]}).encode(),
        "truncated JSON": json.dumps({"inputs": [state]}).encode()[:40],
        "invalid UTF-8": b'{"inputs": [{"name": "\xff\xfe"}]}',
        "deep nesting": b"[" * 100000 + b"]" * 100000,
        "huge number": json.dumps({"inputs": [{**state, "shape": [10**30, 32]}]}).encode(),
        "batch over max": json.dumps({"inputs": [{**state, "shape": [10**6, 32], "data": [0.0] * 32}]}).encode(),
        "unknown output": json.dumps({"inputs": [state], "outputs": [{"name": "nope"}]}).encode(),
        "bad binary header length": json.dumps({"inputs": [state]}).encode(),
    }
    headers = {"bad binary header length": {"Inference-Header-Content-Length": "999999"}}
    return [(name, body, headers.get(name, {})) for name, body in bodies.items()]


def grpc_requests(service_pb2) -> list[tuple[str, object]]:
    """gRPC ModelInferRequests that lie or are malformed (``service_pb2`` from tritonclient.grpc)."""
    out = []
    for model in ("policy", "encoder", "decoder"):
        for shape in LYING_SHAPES:
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                continue  # not expressible in the protobuf message
            request = service_pb2.ModelInferRequest(model_name=model)
            tensor = request.inputs.add(name="images", datatype="UINT8", shape=shape)
            tensor.contents.uint_contents.extend(range(10))
            out.append((f"{model} shape {shape}", request))
    empty = service_pb2.ModelInferRequest(model_name="policy")
    out.append(("policy, no inputs", empty))
    raw = service_pb2.ModelInferRequest(model_name="policy")
    raw.inputs.add(name="state", datatype="FP32", shape=[1, 32])
    raw.raw_input_contents.append(b"\0" * 7)  # 7 bytes for 32 floats
    out.append(("raw contents too short", raw))
    return out
