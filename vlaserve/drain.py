"""Stopping without losing a request: the launcher closes the door, waits for the work admitted, then ends.

tritonserver's own stop (SIGTERM) cannot be used under load. Its schedulers refuse every new request
at once, the hand-off from encoder to decoder included, and it checks its in-flight count at SIGTERM and
then once a second; when it finds none it unloads the models, and while it unloads it answers NOT_FOUND,
a permanent error, to each request that arrives. A request arriving between that check and the moment the
launcher notices is lost, and on a busy 2-core machine that window is long enough to be hit.

So the launcher never sends SIGTERM to tritonserver. Instead:

- it creates ``<status dir>/closing``. Every model instance looks for that file as a batch arrives;
  once it exists, the instances of the models clients call (the encoder, or the policy run as one
  model) answer new batches UNAVAILABLE ("the server is stopping; retry") without computing. The
  decoder still finishes what got past them;
- each instance marks, in ``<status dir>/<instance>.busy`` (two float64: 1 while in ``execute``, and its
  pid), when it is running a batch. It sets the mark *before* it looks for the closing file, so a batch
  that got past the door is visible to the launcher from then on;
- the launcher ends tritonserver's process group once no instance of the group is running a batch, no
  in-flight slot is taken (vlaserve.admission: a request between encoder and decoder) and no request waits
  in the decoder's queue (Triton's pending gauge), continuously for ``QUIET_S``; or after its timeout.

Requests that arrive meanwhile are answered UNAVAILABLE, or find the connection refused or reset:
clients retry both. The models' unloading is what is cut short; nothing is in flight by then.

What it does not do: readiness (``/v2/health/ready``) stays 200 while the door is closed, which lasts
until the admitted requests are answered (well under a second on the benchmarks' machines) and at most
the exit timeout and 10 s. A slot that is never given back (a request cancelled between the models) would
hold the stop until it expires (the decoder's queue timeout and 10 s): slots still taken after
``SLOTS_ALONE_S`` with no instance running a batch and nothing in the decoder's queue are taken to have no
request behind them (where Triton's gauge cannot be read, the stop waits for them instead). A restart after
an instance died waits only for the batches running: such an instance's slots are never given back.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vlaserve.files import write_whole
from vlaserve.interface import DECODER
from vlaserve.supervisor import process_alive

CLOSING_FILE = "closing"
BUSY_SUFFIX = ".busy"
QUIET_S = 0.2  # idle this long, continuously, before the launcher ends the group (answers leave meanwhile)
SLOTS_ALONE_S = 1.0  # in-flight slots taken this long with nothing running or queued: no request behind them
STOPPING_MESSAGE = "the server is stopping; retry (another replica, or this one once restarted)"


def mapped_array(path: Path, values) -> np.memmap:
    """``values`` written to ``path`` whole (a reader never sees a part), then mapped for updates in place
    (float64): the busy mark here, an instance's execute phases (vlaserve.runner)."""
    write_whole(path, np.asarray(values, np.float64).tobytes())
    return np.memmap(path, dtype=np.float64, mode="r+", shape=(len(values),))


def refuses_new_work(model: str) -> bool:
    """Whether instances of ``model`` answer new batches UNAVAILABLE once the door is closed: the models
    clients call do; the decoder finishes what got past them."""
    return model != DECODER


def close(status_dir: Path) -> None:
    """Tell every instance of this start to refuse new work."""
    status_dir = Path(status_dir)
    status_dir.mkdir(parents=True, exist_ok=True)
    (status_dir / CLOSING_FILE).touch()


def busy(status_dir: Path, pids: set[int] | None = None) -> list[str]:
    """The instances running a batch now: marks of processes that no longer run are ignored, and with
    ``pids`` (tritonserver's process group) those of processes outside it."""
    found = []
    for path in Path(status_dir).glob(f"*{BUSY_SUFFIX}"):
        try:
            flag, pid = np.fromfile(path, dtype=np.float64, count=2)
        except (OSError, ValueError):
            continue
        if flag and (pids is None or int(pid) in pids) and process_alive(int(pid)):
            found.append(path.name[: -len(BUSY_SUFFIX)])
    return sorted(found)


class Door:
    """One instance's side: its busy mark, and whether the server is closing. Without a status dir
    (tritonserver started without the launcher) it marks nothing and never closes."""

    def __init__(self, status_dir: str | os.PathLike | None, instance: str):
        self._mark: np.ndarray | None = None
        self._closing: Path | None = None
        if not status_dir:
            return
        status_dir = Path(status_dir)
        status_dir.mkdir(parents=True, exist_ok=True)
        self._mark = mapped_array(status_dir / f"{instance}{BUSY_SUFFIX}", [0.0, os.getpid()])
        self._closing = status_dir / CLOSING_FILE

    def enter(self) -> None:
        """A batch arrived (call before ``closing``)."""
        if self._mark is not None:
            self._mark[0] = 1.0

    def leave(self) -> None:
        """The batch's responses are built."""
        if self._mark is not None:
            self._mark[0] = 0.0

    def closing(self) -> bool:
        return self._closing is not None and self._closing.exists()
