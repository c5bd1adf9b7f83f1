"""The wire interface: tensor names, shapes, dtypes and default ports, in one place.

Everything that talks about a tensor by name (export, the model repository spec, the runner,
the client, the load test) imports it from here.
"""

from __future__ import annotations

import dataclasses

# Request: what a robot sends.
IMAGE_SIZE = 224  # camera frames arrive as uint8 [views, 224, 224, 3]
IMAGE_CHANNELS = 3
MAX_VIEWS = 3
MAX_TOKENS = 48  # prompt token ids, 0 = padding
STATE_DIM = 32
ACTION_HORIZON = 50
ACTION_DIM = 32
NUM_FLOW_STEPS = 10

# Tensor names (Triton inputs/outputs). The policy ensemble's inputs are the union of the
# encoder's and the decoder's request-facing inputs.
IMAGES = "images"
TOKENS = "tokens"
STATE = "state"
NOISE = "noise"
PREFIX_KV = "prefix_kv"
PREFIX_MASK = "prefix_mask"
ACTIONS = "actions"
REQUEST_INPUTS = (IMAGES, TOKENS, STATE, NOISE)  # what a client sends: on the host, at most 0.3 MB an item

ENCODER = "encoder"
DECODER = "decoder"
POLICY = "policy"


@dataclasses.dataclass(frozen=True)
class Step:
    """One model of the pipeline: what it computes on, the request inputs it only checks, what it gives."""

    model: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    checks: tuple[str, ...] = ()


# The pipeline, declared once: the policy ensemble runs these steps in order, each a runner model. The
# ensemble's config, the model configs, the export and the runner read it. The encoder also takes the
# decoder's request inputs (state, noise), only to check them: a request the decoder would reject is then
# rejected before any compute.
PIPELINE = (
    Step(ENCODER, inputs=(IMAGES, TOKENS), outputs=(PREFIX_KV, PREFIX_MASK), checks=(STATE, NOISE)),
    Step(DECODER, inputs=(PREFIX_KV, PREFIX_MASK, STATE, NOISE), outputs=(ACTIONS,)),
)


def request_inputs() -> tuple[str, ...]:
    """The policy's inputs: every step input that no earlier step gives, in pipeline order."""
    given, names = set(), []
    for step in PIPELINE:
        names += [n for n in (*step.inputs, *step.checks) if n not in given and n not in names]
        given.update(step.outputs)
    return tuple(names)


# Files of one model version (<repository>/<model>/1/): the artifacts export writes and the runtimes load,
# the golden samples every instance checks itself against, and the manifest that describes them.
ONNX_FILE = "model.onnx"
ONNX_DATA_FILE = "model.onnx.data"  # the weights beside model.onnx when they pass ONNX's 2 GB protobuf limit
TORCHSCRIPT_FILE = "model.pt"
GOLDEN_FILE = "golden.pt"
MANIFEST_FILE = "manifest.json"

# Default ports of the embedded server (Triton's own defaults).
HTTP_PORT = 8000
GRPC_PORT = 8001
METRICS_PORT = 8002
GATEWAY_PORT = 8003  # the openpi-compatible WebSocket gateway (vlaserve.gateway)
DEFAULT_HOST = "127.0.0.1"
# The header that carries the admin key to Triton's restricted endpoints (model repository, shared memory,
# logging, trace); over gRPC it is metadata, under the key GRPC_ADMIN_HEADER.
ADMIN_HEADER = "vlaserve-admin-key"
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"
# The server's working folder (vlaserve.server --workdir), where the other commands look for it by default;
# the admin key comes from ADMIN_KEY_ENV, or the server generates one into <workdir>/ADMIN_KEY_FILE (mode 0600).
DEFAULT_WORKDIR = ".vlaserve"
ADMIN_KEY_ENV = "VLASERVE_ADMIN_KEY"
ADMIN_KEY_FILE = "admin-key"


def request_shapes(views: int) -> dict[str, tuple[int, ...]]:
    """Per-item shapes (without the batch dimension) of the policy's request tensors."""
    return {
        IMAGES: (views, IMAGE_SIZE, IMAGE_SIZE, IMAGE_CHANNELS),
        TOKENS: (MAX_TOKENS,),
        STATE: (STATE_DIM,),
        NOISE: (ACTION_HORIZON, ACTION_DIM),
    }
