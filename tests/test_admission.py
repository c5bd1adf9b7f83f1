"""The pipeline's in-flight limit (vlaserve.admission): slots shared by processes, taken and given back."""

from __future__ import annotations

import multiprocessing
import time

import numpy as np
import pytest

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


def test_after_the_door_closes_the_models_clients_call_refuse_and_the_decoder_finishes(tmp_path, monkeypatch):
    """A runner's execute() with the door closed: the encoder and the one-model policy answer every request
    UNAVAILABLE without running the batch; the decoder runs it. While a batch runs its instance is marked
    busy, and not once it has left (an exception too)."""
    import types

    from vlaserve import drain, runner

    class Error:
        UNAVAILABLE = "UNAVAILABLE"

        def __init__(self, message, code=None):
            self.message, self.code = message, code

    class Response:
        def __init__(self, output_tensors=None, error=None):
            self.error = error

    monkeypatch.setattr(runner, "pb_utils", types.SimpleNamespace(TritonError=Error, InferenceResponse=Response))
    seen = []

    def make(model: str) -> runner.TritonPythonModel:
        model_runner = runner.TritonPythonModel()
        model_runner.model_name, model_runner.admission = model, None
        model_runner.door = drain.Door(tmp_path, f"{model}_0")
        model_runner.refuses_on_close = drain.refuses_new_work(model)

        def run(requests):
            seen.append((model, drain.busy(tmp_path)))
            if requests == ["boom"]:
                raise RuntimeError("boom")
            return ["answer" for _ in requests]

        model_runner._execute = run
        return model_runner

    runners = {model: make(model) for model in ("encoder", "policy", "decoder")}
    assert runners["encoder"].execute(["a"]) == ["answer"] and seen == [("encoder", ["encoder_0"])]
    assert drain.busy(tmp_path) == []
    drain.close(tmp_path)
    for model in ("encoder", "policy"):
        refused = runners[model].execute(["a", "b"])
        assert [r.error.code for r in refused] == ["UNAVAILABLE"] * 2
        assert drain.STOPPING_MESSAGE in refused[0].error.message
    assert runners["decoder"].execute(["a"]) == ["answer"] and seen[-1] == ("decoder", ["decoder_0"])
    assert len(seen) == 2 and drain.busy(tmp_path) == []
    with pytest.raises(RuntimeError):
        runners["decoder"].execute(["boom"])
    assert drain.busy(tmp_path) == []
