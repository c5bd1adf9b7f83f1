"""A small client over ``tritonclient`` (gRPC or HTTP) for the policy, and ``python -m vlaserve.client``.

``PolicyClient(url).infer(images, tokens, state)`` returns the actions; :func:`make_request` builds
camera-like frames, a state and a prompt. Errors from the server reach the CLI user as one line.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from vlaserve import interface as io
from vlaserve.errors import VlaserveError

PROTOCOLS = ("grpc", "http")
DEFAULT_VOCAB = 1024  # valid ids for every preset (tiny's vocabulary is the smallest)


def default_url(protocol: str, host: str = io.DEFAULT_HOST) -> str:
    return f"{host}:{io.GRPC_PORT if protocol == 'grpc' else io.HTTP_PORT}"


def tokenize(prompt: str, vocab_size: int = DEFAULT_VOCAB) -> np.ndarray:
    """A stand-in tokenizer: each word to a stable id in [1, vocab_size), padded with 0 to MAX_TOKENS."""
    ids = [1 + zlib.crc32(word.encode()) % (vocab_size - 1) for word in prompt.lower().split()][: io.MAX_TOKENS]
    out = np.zeros(io.MAX_TOKENS, dtype=np.int32)
    out[: len(ids)] = ids
    return out


def camera_frames(views: int, rng: np.random.Generator) -> np.ndarray:
    """Camera-like uint8 frames [views, 224, 224, 3]: smooth colour gradients, a bright blob, sensor noise."""
    size = io.IMAGE_SIZE
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    frames = []
    for _ in range(views):
        base = rng.uniform(40, 200, 3) + 50 * np.stack([xx, yy, 1 - xx], -1) * rng.uniform(-1, 1, 3)
        cy, cx = rng.uniform(0.2, 0.8, 2)
        blob = 120 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.01)[..., None]
        frame = base + blob + rng.normal(0, 4, (size, size, 3))
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return np.stack(frames)


def make_request(
    batch: int = 1,
    views: int = 2,
    seed: int = 0,
    prompt: str = "pick up the red block",
    with_noise: bool = False,
    vocab_size: int = DEFAULT_VOCAB,
) -> dict[str, np.ndarray]:
    """One request's tensors, batch-first, with the interface's names and dtypes."""
    rng = np.random.default_rng(seed)
    request = {
        io.IMAGES: np.stack([camera_frames(views, rng) for _ in range(batch)]),
        io.TOKENS: np.stack([tokenize(prompt, vocab_size)] * batch),
        io.STATE: rng.normal(0, 1, (batch, io.STATE_DIM)).astype(np.float32),
    }
    if with_noise:
        request[io.NOISE] = rng.standard_normal((batch, io.ACTION_HORIZON, io.ACTION_DIM), dtype=np.float32)
    return request


def infer_inputs(tc, tensors: dict[str, np.ndarray]) -> list:
    """tritonclient InferInputs of ``tensors`` for the client module ``tc`` (tritonclient.grpc, its aio, or
    tritonclient.http)."""
    from tritonclient.utils import np_to_triton_dtype  # here, so that building a request needs numpy alone

    out = []
    for name, array in tensors.items():
        tensor = tc.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


class PolicyClient:
    """Requests to the policy ensemble (or any model of the repository) over gRPC or HTTP.

    ``shared_memory=True`` (gRPC, a client on the server's host): the inputs travel in a system shared-memory
    region that the client registers once with Triton, and the message carries only where they are (Triton's
    shared-memory extension). Registering is restricted to the server's admin key (vlaserve.server), which
    ``admin_key`` gives. One region per client: use a client from one thread at a time, and ``close()`` it
    (or use it as a context manager) to unregister and remove the region."""

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        model: str = io.POLICY,
        timeout_s: float = 60.0,
        shared_memory: bool = False,
        admin_key: str | None = None,
    ):
        if protocol not in PROTOCOLS:
            raise VlaserveError("protocol", protocol, f"one of {PROTOCOLS}")
        if shared_memory and protocol != "grpc":
            raise VlaserveError("shared memory", f"over {protocol}", "grpc (inputs in system shared memory)")
        if shared_memory and not admin_key:
            raise VlaserveError(
                "shared memory", "no admin key", "the server's admin key (registering shared memory needs it)"
            )
        self.shared_memory, self.admin_key = shared_memory, admin_key
        self.region: tuple[str, object, int] | None = None  # name, handle, bytes of the registered region
        if protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        self.tc, self.protocol, self.model, self.timeout_s = tc, protocol, model, timeout_s
        self.url = url or default_url(protocol)
        self.client = (
            tc.InferenceServerClient(self.url)
            if protocol == "grpc"
            else tc.InferenceServerClient(self.url, connection_timeout=timeout_s, network_timeout=timeout_s)
        )

    def inputs(self, tensors: dict[str, np.ndarray]) -> list:
        return self._shared_inputs(tensors) if self.shared_memory else infer_inputs(self.tc, tensors)

    def _shared_inputs(self, tensors: dict[str, np.ndarray]) -> list:
        """InferInputs of ``tensors`` written into this client's region (registered, or grown, first)."""
        import tritonclient.utils.shared_memory as shm
        from tritonclient.utils import np_to_triton_dtype

        arrays = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
        size = sum(a.nbytes for a in arrays.values())
        if self.region is None or self.region[2] < size:
            self.close()
            name = f"vlaserve_client_{os.getpid()}_{secrets.token_hex(4)}"
            handle = shm.create_shared_memory_region(name, f"/{name}", size, create_only=True)
            try:
                self.client.register_system_shared_memory(name, f"/{name}", size, headers=self._admin_headers())
            except Exception:
                shm.destroy_shared_memory_region(handle)
                raise
            self.region = (name, handle, size)
        name, handle, _ = self.region
        out, offset = [], 0
        for key, array in arrays.items():
            shm.set_shared_memory_region(handle, [array], offset=offset)
            tensor = self.tc.InferInput(key, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_shared_memory(name, array.nbytes, offset=offset)
            out.append(tensor)
            offset += array.nbytes
        return out

    def _admin_headers(self) -> dict[str, str]:
        return {io.GRPC_ADMIN_HEADER: self.admin_key}

    def close(self) -> None:
        """Unregister and remove the shared-memory region, if any (the client itself stays usable)."""
        if self.region is None:
            return
        try:
            self.client.unregister_system_shared_memory(self.region[0], headers=self._admin_headers())
        finally:
            self._forget_region()

    def _forget_region(self) -> None:
        """Remove the region on this side only (close() unregisters it first; a restarted server no longer knows it)."""
        import tritonclient.utils.shared_memory as shm

        _, handle, _ = self.region
        self.region = None
        shm.destroy_shared_memory_region(handle)

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def infer(self, tensors: dict[str, np.ndarray], priority: int = 0, output: str = io.ACTIONS) -> np.ndarray:
        """Send one request; returns the named output. Raises tritonclient's InferenceServerException. With
        shared memory, a server that no longer knows the region (restarted since) gets it registered again,
        once."""
        kwargs = {"priority": priority} if priority else {}
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout_s
        outputs = [self.tc.InferRequestedOutput(output)]
        try:
            result = self.client.infer(self.model, self.inputs(tensors), outputs=outputs, **kwargs)
        except Exception as exc:
            if self.region is None or "shared memory region" not in str(exc):
                raise
            self._forget_region()
            result = self.client.infer(self.model, self.inputs(tensors), outputs=outputs, **kwargs)
        return result.as_numpy(output)

    def views(self) -> int:
        """Views per request the served policy takes (from the model's metadata)."""
        meta = self.client.get_model_metadata(self.model)
        inputs = meta.inputs if self.protocol == "grpc" else [argparse.Namespace(**i) for i in meta["inputs"]]
        shape = next(i.shape for i in inputs if i.name == io.IMAGES)
        return int(shape[1])

    def statistics(self, model: str) -> dict:
        """Inference, execution, success and failure counts of a model (Triton's statistics extension)."""
        stats = (
            self.client.get_inference_statistics(model, as_json=True)
            if self.protocol == "grpc"
            else self.client.get_inference_statistics(model)
        )
        entry = stats["model_stats"][0]
        requests = entry.get("inference_stats", {})
        return {
            "inference_count": int(entry.get("inference_count", 0)),
            "execution_count": int(entry.get("execution_count", 0)),
            "success_count": int(requests.get("success", {}).get("count", 0)),  # requests answered
            "fail_count": int(requests.get("fail", {}).get("count", 0)),  # requests answered with an error
        }


def readiness_problem(url: str, protocol: str, model: str) -> str | None:
    """None when ``model`` is ready on the server at ``url``; else one line saying what is wrong."""
    try:
        client = PolicyClient(url, protocol, model, timeout_s=5)
        if not client.client.is_model_ready(model):
            return f"model '{model}' is not ready (or unknown) on {url}"
    except Exception as exc:  # noqa: BLE001 - connection errors come in several types
        return f"cannot reach the server at {url} ({protocol}): {error_line(exc)}"
    return None


def error_line(exc: Exception) -> str:
    """One clear line from a tritonclient exception (or any other)."""
    status = getattr(exc, "status", lambda: None)()
    message = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    return f"[{status}] {message}" if status else message


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vlaserve.client",
        description="Send camera-like frames, a state and a prompt to the policy; print the actions and latency.",
    )
    parser.add_argument("--protocol", default="grpc", choices=PROTOCOLS, help="default: grpc")
    parser.add_argument(
        "--url", help=f"host:port (default: {default_url('grpc')} for grpc, {default_url('http')} for http)"
    )
    parser.add_argument("--model", default=io.POLICY, help=f"default: {io.POLICY}")
    parser.add_argument("--batch", type=int, default=1, help="items per request (default: 1)")
    parser.add_argument("--requests", type=int, default=1, help="how many requests to send (default: 1)")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at once (default: 1)")
    parser.add_argument(
        "--prompt", default="pick up the red block", help="prompt text (a stand-in tokenizer maps words to ids)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the frames, state and noise (default: 0)")
    parser.add_argument(
        "--noise", action="store_true", help="send noise too (reproducible actions); else the server draws it"
    )
    parser.add_argument(
        "--priority", type=int, default=0, help="request priority: 1 = control, 2 = background (default: model's)"
    )
    parser.add_argument(
        "--shared-memory",
        action="store_true",
        help="gRPC, on the server's host: send the inputs through system shared memory (needs the admin key)",
    )
    parser.add_argument(
        "--admin-key-file",
        type=Path,
        default=Path(io.DEFAULT_WORKDIR) / io.ADMIN_KEY_FILE,
        help="for --shared-memory when $VLASERVE_ADMIN_KEY is unset: the key the server generated "
        "(default: .vlaserve/admin-key)",
    )
    return parser.parse_args(argv)


def admin_key(args: argparse.Namespace) -> str:
    """The admin key for --shared-memory: $VLASERVE_ADMIN_KEY, else the key file's."""
    key = os.environ.get(io.ADMIN_KEY_ENV)
    if key:
        return key
    if not args.admin_key_file.is_file():
        raise VlaserveError(
            "--shared-memory",
            "no admin key",
            f"$VLASERVE_ADMIN_KEY, or the key file the server generated ({args.admin_key_file} does not exist)",
        )
    return args.admin_key_file.read_text().strip()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.batch < 1 or args.requests < 1 or args.concurrency < 1:
            raise VlaserveError(
                "--batch/--requests/--concurrency", (args.batch, args.requests, args.concurrency), "positive integers"
            )
        key = admin_key(args) if args.shared_memory else None
        client = PolicyClient(args.url, args.protocol, args.model, shared_memory=args.shared_memory, admin_key=key)
        request = make_request(args.batch, client.views(), args.seed, args.prompt, with_noise=args.noise)

        local = threading.local()  # one connection (and shared-memory region) per worker thread
        clients = []

        def one(_):
            if not hasattr(local, "client"):
                local.client = PolicyClient(client.url, args.protocol, args.model, shared_memory=args.shared_memory,
                                            admin_key=key)  # fmt: skip
                clients.append(local.client)
            start = time.perf_counter()
            actions = local.client.infer(request, args.priority)
            return actions, (time.perf_counter() - start) * 1e3

        started = time.perf_counter()
        try:
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - started
        finally:
            for c in clients:  # each on its own: one failing leaves the others' regions to close
                try:
                    c.close()
                except Exception as exc:  # noqa: BLE001 - said, and the others still closed
                    print(f"infer: warning: a shared-memory region was not removed: {error_line(exc)}", file=sys.stderr)
    except VlaserveError as exc:
        print(f"infer: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - tritonclient raises several types; the user gets one line
        print(f"infer: error: {error_line(exc)}", file=sys.stderr)
        return 1
    actions = results[0][0]
    latencies = sorted(ms for _, ms in results)
    print(
        f"actions: shape {list(actions.shape)} dtype {actions.dtype}, first values {[round(float(x), 4) for x in actions[0, 0, :4]]}"
    )
    print(
        f"{len(results)} request(s) of batch {args.batch} over {args.protocol}"
        f"{' (inputs in shared memory)' if args.shared_memory else ''} to {client.url}: "
        f"p50 {statistics.median(latencies):.1f} ms, max {latencies[-1]:.1f} ms, "
        f"{len(results) * args.batch / wall:.1f} inferences/s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
