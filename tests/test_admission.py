"""The pipeline's in-flight limit (vlaserve.admission): slots shared by processes, taken and given back."""

from __future__ import annotations

import multiprocessing
import time

import numpy as np

from vlaserve import admission


def test_slots_are_taken_up_to_the_limit_given_back_oldest_first_and_expire(tmp_path):
    path = tmp_path / admission.ADMISSION_FILE
    enc = admission.Admission(path, limit=8, ttl_s=60)
    assert enc.try_acquire(100) and admission.taken(path) == 0  # no file yet: no admission (warm-up, no launcher)
    admission.create(path)
    enc._next_look = 0.0
    dec = admission.Admission(path, limit=8, ttl_s=60)
    assert enc.try_acquire(5) and not enc.try_acquire(4) and enc.try_acquire(3)
    assert admission.taken(path) == 8 and not enc.acquire(1, timeout_s=0.05)
    dec.release(2)
    assert admission.taken(path) == 6 and enc.try_acquire(2) and not enc.try_acquire(1)
    short = admission.Admission(path, limit=8, ttl_s=0.2)
    dec.release(8)
    assert short.try_acquire(8) and not enc.try_acquire(1)
    time.sleep(0.3)  # a slot nobody gave back is lent again after its ttl
    assert admission.taken(path) == 0 and enc.try_acquire(8)


def _take(path, n, out):
    a = admission.Admission(path, limit=64, ttl_s=60)
    out.put(sum(a.try_acquire(1) for _ in range(n)))


def test_processes_never_take_more_than_the_limit_together(tmp_path):
    path = tmp_path / admission.ADMISSION_FILE
    admission.create(path)
    out = multiprocessing.get_context("spawn").Queue()
    procs = [multiprocessing.get_context("spawn").Process(target=_take, args=(path, 40, out)) for _ in range(4)]
    for p in procs:
        p.start()
    taken = sum(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    assert taken == 64 and admission.taken(path) == 64


def test_acquire_gives_up_when_told_to(tmp_path):
    path = tmp_path / admission.ADMISSION_FILE
    admission.create(path)
    enc = admission.Admission(path, limit=1, ttl_s=60)
    assert enc.try_acquire(1)
    start = time.monotonic()
    assert not enc.acquire(1, timeout_s=10, give_up=lambda: time.monotonic() - start > 0.1)
    assert time.monotonic() - start < 2


def test_the_door_marks_batches_running_and_closes(tmp_path):
    """An instance's busy mark is seen by the launcher while it runs a batch, not once it has left or its
    process is gone; the closing file reaches every instance; without a status dir nothing happens."""
    from vlaserve import drain

    door = drain.Door(tmp_path, "encoder_cpu_0")
    assert drain.busy(tmp_path) == [] and not door.closing()
    door.enter()
    assert drain.busy(tmp_path) == ["encoder_cpu_0"]
    door.leave()
    assert drain.busy(tmp_path) == []
    dead = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    (tmp_path / f"gone{drain.BUSY_SUFFIX}").write_bytes(np.array([1.0, dead.pid], np.float64).tobytes())
    assert drain.busy(tmp_path) == []  # a killed instance's mark does not hold the stop up
    drain.close(tmp_path)
    assert door.closing() and drain.Door(tmp_path, "decoder_cpu_0").closing()
    nowhere = drain.Door(None, "x")
    nowhere.enter()
    assert not nowhere.closing()
