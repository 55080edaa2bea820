"""The batcher's worker thread under failure and shutdown: every call it accepts gets an answer (its own rows, or
the error of its own input), and none waits forever, whatever the session returns or when close() comes."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from medtriage.serve.batching import BatchingSession

JOIN_S = 1.0


class Session:
    """An ORT-like session over input 'pixels': per-image probabilities `[N, 2]` from each image's mean, plus an
    optional `extra` output made from the whole batch. Every call waits for `gate` and is recorded in `sizes`."""

    def __init__(self, extra=None, gate: threading.Event | None = None):
        self.extra, self.gate, self.sizes = extra, gate, []

    def get_inputs(self):
        return [SimpleNamespace(name="pixels")]

    def run(self, outputs, feeds, run_options=None):
        pixels = feeds["pixels"]
        if pixels.ndim == 0:
            raise ValueError("input 'pixels' has rank 0, expected 4")
        self.sizes.append(len(pixels))
        if self.gate is not None:
            self.gate.wait(JOIN_S)
        means = pixels.reshape(len(pixels), -1).mean(axis=1)
        probs = np.stack([1 - means, means], axis=1)
        return [probs] if self.extra is None else [probs, self.extra(pixels)]


class Caller(threading.Thread):
    """One request: `batcher.run` in its own thread, its answer or error kept."""

    def __init__(self, batcher, pixels, barrier: threading.Barrier | None = None):
        super().__init__(daemon=True)
        self.batcher, self.pixels, self.barrier = batcher, pixels, barrier
        self.answer, self.error = None, None

    def run(self):
        if self.barrier is not None:
            self.barrier.wait(JOIN_S)
        try:
            self.answer = self.batcher.run(None, {"pixels": self.pixels})
        except Exception as err:  # noqa: BLE001 -- checked by the test
            self.error = err


def image(value: float) -> np.ndarray:
    return np.full((1, 1, 4, 4), value, dtype=np.float32)


def finished(*threads: threading.Thread) -> bool:
    for thread in threads:
        thread.join(timeout=JOIN_S)
    return not any(thread.is_alive() for thread in threads)


def wait_until(condition, seconds: float = JOIN_S) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)


def test_a_call_made_while_the_batcher_closes_is_answered():
    gate = threading.Event()
    session = Session(gate=gate)
    batcher = BatchingSession(session, max_batch=4, wait_ms=0)
    first = Caller(batcher, image(0.2))
    first.start()
    wait_until(lambda: session.sizes)  # the worker is inside the session with the first call
    closer = threading.Thread(target=batcher.close, daemon=True)
    closer.start()
    wait_until(lambda: batcher._queue.qsize() == 1)  # the stop marker is queued
    late = Caller(batcher, image(0.7))
    late.start()
    wait_until(lambda: len(session.sizes) == 2 or batcher._queue.qsize() == 2)
    gate.set()
    assert finished(first, late, closer), "a call made during close() was queued behind the stop marker and never answered"
    assert late.error is None and first.error is None
    np.testing.assert_allclose(late.answer[0], [[0.3, 0.7]], atol=1e-6)
    np.testing.assert_allclose(first.answer[0], [[0.8, 0.2]], atol=1e-6)


def _one_row_for_the_batch(pixels):
    return pixels.reshape(1, -1).mean(axis=1, keepdims=True)


def _scalar(pixels):
    return np.float32(pixels.mean())


@pytest.mark.parametrize("extra", [_one_row_for_the_batch, _scalar], ids=["one-row-for-the-batch", "scalar"])
def test_outputs_without_a_row_per_image_are_not_split_across_requests(extra):
    session = Session(extra=extra)
    batcher = BatchingSession(session, max_batch=3, wait_ms=500)
    values = [0.1, 0.5, 0.9]
    barrier = threading.Barrier(len(values))
    callers = [Caller(batcher, image(v), barrier) for v in values]
    for caller in callers:
        caller.start()
    try:
        assert finished(*callers), "the batcher's worker died on the stacked results; its requests wait forever"
    finally:
        batcher.close()
    assert session.sizes[0] == len(values)  # the three calls were stacked first
    for caller, value in zip(callers, values):
        assert caller.error is None
        alone = Session(extra=extra).run(None, {"pixels": image(value)})
        for have, want in zip(caller.answer, alone):
            np.testing.assert_allclose(have, want, atol=1e-6)


def test_an_input_without_a_batch_axis_fails_only_its_own_call():
    session = Session()
    batcher = BatchingSession(session, max_batch=2, wait_ms=0)
    bad = Caller(batcher, np.float32(0.5))
    bad.start()
    try:
        assert finished(bad), "a rank-0 input killed the batcher's worker; its request waits forever"
        assert isinstance(bad.error, ValueError) and "rank 0" in str(bad.error)
        good = Caller(batcher, image(0.25))
        good.start()
        assert finished(good)
        np.testing.assert_allclose(good.answer[0], [[0.75, 0.25]], atol=1e-6)
        assert batcher.stats.calls == 1  # the good call still went through the worker
    finally:
        batcher.close()
