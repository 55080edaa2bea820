"""How long closing the batcher waits: at once when it holds no call, at most its timeout when an inference call never
ends (which cannot be interrupted), and `serve` waits for it only briefly once uvicorn has stopped."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import uvicorn

from medtriage.cli import build_parser
from medtriage.serve import cli
from medtriage.serve.batching import BatchingSession, enable_batching

STUCK_S = 60.0  # a call held this long stands for one that never ends; the tests release it when done


class HeldSession:
    """An ORT-like session (or one standing in for `inner`) whose every call waits for `release` (up to STUCK_S);
    `entered` is set once one has begun."""

    def __init__(self, inner=None):
        self.inner, self.entered, self.release = inner, threading.Event(), threading.Event()

    def get_inputs(self):
        return self.inner.get_inputs() if self.inner else [SimpleNamespace(name="pixels")]

    def __getattr__(self, name):  # get_outputs, get_providers ... of a real session it stands in for
        return getattr(self.__dict__["inner"], name)

    def run(self, outputs, feeds, run_options=None):
        self.entered.set()
        self.release.wait(STUCK_S)
        return [np.zeros((len(next(iter(feeds.values()))), 2), dtype=np.float32)]


def held_call(batcher: BatchingSession, session: HeldSession) -> threading.Thread:
    """One request's call, started and inside the session when this returns."""
    caller = threading.Thread(target=batcher.run, args=(None, {batcher.input_name: np.zeros((1, 1, 4, 4), np.float32)}), daemon=True)
    caller.start()
    assert session.entered.wait(30)
    return caller


def timed(work) -> tuple[object, float]:
    started = time.monotonic()
    result = work()
    return result, time.monotonic() - started


def test_close_with_nothing_pending_returns_at_once_whatever_its_timeout():
    for wait_ms in (0.0, 60_000.0):  # a long batch window holds nothing once its calls are answered
        session = HeldSession()
        session.release.set()
        batcher = BatchingSession(session, max_batch=4, wait_ms=wait_ms)
        ended, seconds = timed(lambda b=batcher: b.close(timeout=30))
        assert ended is True and seconds < 1.0, (wait_ms, seconds)


def test_close_with_a_stuck_call_returns_after_its_timeout_and_says_so():
    session = HeldSession()
    batcher = BatchingSession(session, max_batch=4, wait_ms=0)
    caller = held_call(batcher, session)
    try:
        ended, seconds = timed(lambda: batcher.close(timeout=0.5))
        assert ended is False and 0.5 <= seconds < 10.0, seconds  # not the default wait of 10 s
    finally:
        session.release.set()
    caller.join(30)
    assert not caller.is_alive() and batcher.close(timeout=30) is True  # the call ended, and the worker after it


def test_close_returns_as_soon_as_the_call_in_hand_ends():
    session = HeldSession()
    batcher = BatchingSession(session, max_batch=4, wait_ms=0)
    held_call(batcher, session)
    threading.Timer(0.2, session.release.set).start()
    ended, seconds = timed(lambda: batcher.close(timeout=30))
    assert ended is True and seconds < 10.0, seconds


def test_serve_waits_briefly_for_a_call_left_running_when_uvicorn_stopped(package_dir, monkeypatch):
    """As after a second Ctrl-C: uvicorn returns while an inference call still runs, and the command ends without
    the batcher's default wait."""
    held, stopped = {}, {}

    def batching_a_held_session(predictor, max_batch, wait_ms):
        held["session"] = predictor.session = HeldSession(predictor.session)
        held["batcher"] = enable_batching(predictor, max_batch, wait_ms)
        return held["batcher"]

    def uvicorn_stopped_mid_call(app, **options):
        held_call(held["batcher"], held["session"])
        stopped["at"] = time.monotonic()

    monkeypatch.setattr(cli, "enable_batching", batching_a_held_session)
    monkeypatch.setattr(uvicorn, "run", uvicorn_stopped_mid_call)
    args = build_parser().parse_args(["serve", str(package_dir), "--max-batch", "2", "--threads", "1"])
    try:
        assert cli.run_serve(args) == 0
        assert time.monotonic() - stopped["at"] < 5.0
    finally:
        held["session"].release.set()
