"""The wire interface: tensor names, shapes, dtypes and default ports, in one place.

Everything that talks about a tensor by name (export, the model repository spec, the runner,
the client, the load test) imports it from here.
"""

from __future__ import annotations

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

ENCODER = "encoder"
DECODER = "decoder"
POLICY = "policy"

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
DEFAULT_HOST = "127.0.0.1"


def request_shapes(views: int) -> dict[str, tuple[int, ...]]:
    """Per-item shapes (without the batch dimension) of the policy's request tensors."""
    return {
        IMAGES: (views, IMAGE_SIZE, IMAGE_SIZE, IMAGE_CHANNELS),
        TOKENS: (MAX_TOKENS,),
        STATE: (STATE_DIM,),
        NOISE: (ACTION_HORIZON, ACTION_DIM),
    }
