"""Dynamic batching: inference calls from concurrent requests (HTTP uploads in `serve`, received instances
in `listen`) that arrive within a short wait share one ONNX Runtime call.

`BatchingSession` wraps an ORT session and keeps its `run(output_names, feeds)` signature, so a
Predictor uses it unchanged (`enable_batching`). A single worker thread collects calls: the first one
opens a window of `wait_ms`; calls arriving in it join until `max_batch` images are queued. Only inputs
of the same shape (channels, height, width) and the same requested outputs are stacked: the model
resizes inside its graph, so padding or resizing outside it would change what the model sees. Each
shape group of a window is one ORT call. A call larger than `max_batch` (a multi-frame object) runs
alone; if a stacked call fails, its members run one by one so one bad input fails only its request.
"""

from __future__ import annotations

import argparse
import logging
import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from medtriage.arguments import positive_int

log = logging.getLogger(__name__)
_STOP = object()
DEFAULT_MAX_BATCH, DEFAULT_WAIT_MS = 1, 5.0
CLOSE_WAIT_S = 10.0  # how long close() waits by default for the calls in hand
MAX_WAIT_MS = threading.TIMEOUT_MAX * 1000  # a longer wait raises in the worker, and the call it holds waits forever


@dataclass
class _Call:
    outputs: tuple[str, ...] | None
    pixels: np.ndarray
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> tuple:
        return self.outputs, self.pixels.shape[1:], self.pixels.dtype.str


@dataclass
class BatchStats:
    """What the worker did, for logs and benchmarks: ORT calls answered and images they carried, and calls that failed."""

    calls: int = 0
    images: int = 0
    failed: int = 0  # a stacked one's calls are then run one by one: a graph that cannot stack pays twice, and shows here

    @property
    def mean_batch(self) -> float:
        return self.images / self.calls if self.calls else 0.0


class _StatsCollector:
    """BatchStats as Prometheus counters: medtriage_batch_calls_total, medtriage_batch_images_total,
    medtriage_batch_failed_calls_total."""

    def __init__(self, stats: BatchStats):
        self.stats = stats

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily("medtriage_batch_calls", "ONNX Runtime calls made by the batcher", value=self.stats.calls)
        yield CounterMetricFamily(
            "medtriage_batch_images", "Images those calls carried (images / calls: mean batch)", value=self.stats.images
        )
        yield CounterMetricFamily(
            "medtriage_batch_failed_calls",
            "ONNX Runtime calls of the batcher that failed (a stacked call's inputs are then run one by one)",
            value=self.stats.failed,
        )


class BatchingSession:
    """An ORT session whose `run` stacks concurrent calls with one input into shared calls."""

    def __init__(self, session, max_batch: int = 16, wait_ms: float = 5.0):
        if max_batch < 1 or not 0 <= wait_ms <= MAX_WAIT_MS:
            raise ValueError(f"max_batch must be >= 1 and wait_ms from 0 to {MAX_WAIT_MS:.0f} (got {max_batch}, {wait_ms})")
        self.session, self.max_batch, self.wait_s = session, int(max_batch), wait_ms / 1000.0
        self.input_name = session.get_inputs()[0].name
        self.stats = BatchStats()
        self._queue: queue.Queue = queue.Queue()
        self._closed, self._closing = False, threading.Lock()  # no call may be queued behind the stop marker
        self._worker = threading.Thread(target=self._loop, name="medtriage-batching", daemon=True)
        self._worker.start()

    def __getattr__(self, name):  # get_inputs, get_outputs, get_providers ... of the wrapped session
        return getattr(self.session, name)

    def run(self, output_names, feeds: dict, run_options=None) -> list[np.ndarray]:
        call = self._queued(output_names, feeds, run_options)
        if call is None:  # not stackable, or the batcher is closed: the wrapped session answers it
            return self.session.run(output_names, feeds, run_options)
        return call.future.result()

    def _queued(self, output_names, feeds: dict, run_options) -> _Call | None:
        if set(feeds) != {self.input_name} or run_options is not None:
            return None
        pixels = np.asarray(feeds[self.input_name])
        if pixels.ndim == 0:  # nothing to stack along; the session says what is wrong with it
            return None
        call = _Call(tuple(output_names) if output_names else None, pixels)
        with self._closing:
            if self._closed or not self._worker.is_alive():
                return None
            self._queue.put(call)
        return call

    def expose(self, registry) -> None:
        """Publish the batcher's counters in a Prometheus `registry` (the serving process's /metrics)."""
        registry.register(_StatsCollector(self.stats))

    def close(self, timeout: float = CLOSE_WAIT_S) -> bool:
        """Stop the worker after the calls already queued; later calls go straight to the wrapped session. Waits up
        to `timeout` seconds for those calls: an idle worker ends at once, one in an inference call ends with it (the
        call cannot be interrupted). Whether the worker ended; if not, it ends on its own (a daemon thread)."""
        with self._closing:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        self._worker.join(timeout=max(0.0, timeout))
        if self._worker.is_alive():
            log.warning("the batcher still runs an inference call after %.1f s; it is not waited for", timeout)
            return False
        return True

    def _loop(self) -> None:
        carry: _Call | None = None
        while True:
            first = carry if carry is not None else self._queue.get()
            if first is _STOP:
                return
            carry = self._answer_window(first)
            del first  # while idle the worker holds no request's pixels (full-size images, up to max_batch of them)
            if carry is _STOP:
                return

    def _answer_window(self, first: _Call) -> object | None:
        """Answer `first` and the calls that join its window; returns the call carried into the next window."""
        window, carry = self._collect(first)
        for calls in _groups(window):
            self._execute(calls)
        return carry

    def _collect(self, first: _Call) -> tuple[list[_Call], object | None]:
        """`first` plus the calls that arrive within the wait, up to max_batch images; the call that would
        overflow is carried into the next window."""
        window, images = [first], len(first.pixels)
        deadline = time.perf_counter() + self.wait_s
        while images < self.max_batch:
            try:
                call = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if call is _STOP or images + len(call.pixels) > self.max_batch:
                return window, call
            window.append(call)
            images += len(call.pixels)
        return window, None

    def _execute(self, calls: list[_Call]) -> None:
        try:
            stacked = calls[0].pixels if len(calls) == 1 else np.concatenate([c.pixels for c in calls])
            answers = _split(calls, self._run(calls[0].outputs, stacked))
        except Exception as err:  # noqa: BLE001 -- handed to the waiting request, which raises it
            if len(calls) == 1:
                calls[0].future.set_exception(err)
                return
            log.warning("a stacked inference call of %d requests failed (%s); running them one by one", len(calls), err)
            for call in calls:
                self._execute([call])
            return
        for call, answer in zip(calls, answers):
            call.future.set_result(answer)

    def _run(self, outputs, pixels: np.ndarray) -> list[np.ndarray]:
        try:
            results = self.session.run(list(outputs) if outputs else None, {self.input_name: pixels})
        except Exception:
            self.stats.failed += 1
            raise
        self.stats.calls += 1
        self.stats.images += len(pixels)
        return results


def _split(calls: list[_Call], results: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Each call's rows of a stacked call's results. A call run alone gets the results as the session returned
    them; a stacked call whose outputs do not have one row per image cannot be split back (ValueError)."""
    if len(calls) == 1:
        return [results]
    images = sum(len(call.pixels) for call in calls)
    shapes = [np.shape(r) for r in results]
    if any(not shape or shape[0] != images for shape in shapes):
        raise ValueError(f"outputs of shapes {shapes} have no row for each of the {images} stacked images")
    bounds = np.cumsum([0] + [len(call.pixels) for call in calls])
    return [[r[start:end] for r in results] for start, end in zip(bounds[:-1], bounds[1:])]


def _groups(window: list[_Call]) -> list[list[_Call]]:
    """Calls of one window grouped by what can be stacked (outputs, shape, dtype), in arrival order."""
    groups: dict[tuple, list[_Call]] = defaultdict(list)
    for call in window:
        groups[call.key].append(call)
    return list(groups.values())


def enable_batching(predictor, max_batch: int, wait_ms: float) -> BatchingSession | None:
    """Route `predictor`'s inference through a BatchingSession (None, and no change, when max_batch is 1)."""
    if max_batch <= 1:
        return None
    predictor.session = BatchingSession(predictor.session, max_batch, wait_ms)
    return predictor.session


def concurrent_requests(max_concurrent: int | None, max_batch: int) -> int | None:
    """Requests to decode and score at once: --max-concurrent if given; with batching on, at least
    max_batch (fewer requests in flight could never fill a batch); else None, the admission default."""
    if max_concurrent or max_batch <= 1:
        return max_concurrent
    from medtriage.serve.admission import default_workers

    return max(max_batch, default_workers())


def add_batching_options(
    parser, at_once: str = "unless --max-concurrent says otherwise, N requests (or one per core, if more) are then decoded at once"
) -> None:
    """`--max-batch` and `--batch-wait-ms` of a serving command (serve, listen); `at_once` says how many
    inputs that command decodes at once with batching on."""
    parser.add_argument(
        "--max-batch",
        type=positive_int,
        default=DEFAULT_MAX_BATCH,
        metavar="N",
        help=f"stack up to N images of concurrent inputs into one inference call; 1 turns batching off; {at_once} (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=_non_negative_float,
        default=DEFAULT_WAIT_MS,
        metavar="MS",
        help="how long the first input of a batch waits for others to join (default: %(default)s)",
    )


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= MAX_WAIT_MS:
        raise argparse.ArgumentTypeError(
            f"expected a number of milliseconds from 0 to {MAX_WAIT_MS:.0f} (the longest wait this platform can time), got {text!r}"
        )
    return value
