"""Admission at the door: a limit on the requests between the encoder and the decoder.

Under overload, a request that the encoder has computed and the decoder then rejects (its queue
full, or its queue timeout) is work thrown away. A bound on the decoder's queue alone does not stop
that: once the encoder hands a batch on, it takes the next one, and the decoder's queue fills up
behind it. So the pipeline has one shared limit, ``models.policy.max_in_flight`` in the spec:

- an encoder instance takes slots for a batch *before* it computes; while there is no room it
  waits (so its own queue fills, and Triton turns further requests away at the door, with
  "Exceeds maximum queue size", before any compute); after its queue timeout it answers
  UNAVAILABLE (retryable);
- a decoder instance gives back one slot per request it has answered (right or wrong);
- the decoder's queue holds at least ``max_in_flight`` requests (the spec requires it), so it never
  rejects what the encoder admitted.

The slots live in one small file shared by every instance process of one server start
(``<workdir>/instances/admission.slots``): one float64 expiry time per slot, 0 for a free one,
guarded by ``flock``. A slot also expires by itself ``ttl`` seconds after it was taken, so a slot
that no decoder gives back (a request cancelled between the models, a client calling the encoder
directly) is lent out again later rather than lost. The launcher creates the file after the server
is ready: the model warm-up requests, which each model runs on its own while loading, take and give
back no slots. A tritonserver started without the launcher runs without admission.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import numpy as np

from vlaserve.files import write_whole

ADMISSION_FILE = "admission.slots"
MAX_SLOTS = 4096  # the file's size in slots: max_in_flight may not exceed it


def create(path: Path) -> None:
    """Write a file of free slots (atomically: instances only ever open a complete one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, np.zeros(MAX_SLOTS, np.float64).tobytes())


def taken(path: Path) -> int:
    """Slots taken and not expired, read once without a lock (0 without the file)."""
    try:
        return int(np.count_nonzero(np.fromfile(path, dtype=np.float64) > time.time()))
    except (OSError, ValueError):
        return 0


class Admission:
    """One instance's view of the shared slots. Until the launcher has created them, it admits everything."""

    def __init__(self, path: Path, limit: int, ttl_s: float):
        self.path, self.limit, self.ttl_s = Path(path), int(limit), float(ttl_s)
        self._fd: int | None = None
        self._slots: np.ndarray | None = None
        self._next_look = 0.0

    def ready(self) -> bool:
        """Whether the launcher has created the slots (looked for at most twice a second)."""
        if self._slots is not None:
            return True
        now = time.monotonic()
        if now < self._next_look:
            return False
        self._next_look = now + 0.5
        if not self.path.is_file():
            return False
        self._fd = os.open(self.path, os.O_RDWR)
        self._slots = np.memmap(self.path, dtype=np.float64, mode="r+", shape=(MAX_SLOTS,))[: self.limit]
        return True

    def try_acquire(self, count: int) -> bool:
        """Take ``count`` slots if that many are free now (always true before the file exists)."""
        if not self.ready():
            return True
        with self._locked():
            now = time.time()
            free = np.flatnonzero(self._slots <= now)
            if len(free) < count:
                return False
            self._slots[free[:count]] = now + self.ttl_s
            return True

    def acquire(self, count: int, timeout_s: float, poll_s: float = 0.001, give_up=None) -> bool:
        """Wait up to ``timeout_s`` for ``count`` free slots and take them; False if they did not come, or
        as soon as ``give_up()`` is true (the server is stopping)."""
        deadline = time.monotonic() + timeout_s
        while not self.try_acquire(count):
            if time.monotonic() >= deadline or (give_up is not None and give_up()):
                return False
            time.sleep(poll_s)
        return True

    def release(self, count: int) -> None:
        """Give back ``count`` slots, the oldest first (the requests answered were admitted earliest)."""
        if count <= 0 or not self.ready():
            return
        with self._locked():
            taken = np.flatnonzero(self._slots > time.time())
            oldest = taken[np.argsort(self._slots[taken], kind="stable")][:count]
            self._slots[oldest] = 0.0

    def _locked(self):
        return _Flock(self._fd)


class _Flock:
    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
