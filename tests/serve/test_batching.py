"""Dynamic batching on a real ORT session: concurrent calls share inference calls and each gets its own
answer, shapes are never mixed, max_batch holds, and one bad input fails only its own request."""

from __future__ import annotations

import argparse
import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medtriage.serve.batching import (
    BatchingSession,
    add_batching_options,
    concurrent_requests,
    enable_batching,
)
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor
from tests.export.tiny_package import NPZ

NPZ_IMAGES = 12


class Recording:
    """A real ORT session that records the batch size of each call; an image full of -1 makes it fail."""

    def __init__(self, session):
        self.session, self.sizes = session, []

    def __getattr__(self, name):
        return getattr(self.session, name)

    def run(self, outputs, feeds, run_options=None):
        (pixels,) = feeds.values()
        self.sizes.append(len(pixels))
        if (pixels.reshape(len(pixels), -1) == -1).all(axis=1).any():
            raise RuntimeError("poisoned input")
        return self.session.run(outputs, feeds, run_options)


@pytest.fixture(scope="module")
def images():
    """Real PneumoniaMNIST validation images, each `[1, 1, 28, 28]` in [0, 1]."""
    with np.load(NPZ) as npz:
        return [(image[None, None] / 255).astype(np.float32) for image in npz["val_images"][:NPZ_IMAGES]]


def concurrently(fn, inputs):
    """fn(x) for every input, each in its own thread, all released at once."""
    barrier = threading.Barrier(len(inputs))

    def call(x):
        barrier.wait()
        return fn(x)

    with ThreadPoolExecutor(len(inputs)) as pool:
        return list(pool.map(call, inputs))


def batching_predictor(package_dir, max_batch, wait_ms) -> tuple[Predictor, Recording]:
    predictor = Predictor(load_package(package_dir), threads=1)
    recording = Recording(predictor.session)
    predictor.session = recording
    enable_batching(predictor, max_batch, wait_ms)
    return predictor, recording


def test_concurrent_calls_share_ort_calls_and_get_their_own_answers(package_dir, images):
    expected = [Predictor(load_package(package_dir), threads=1).probabilities(x) for x in images]
    predictor, recording = batching_predictor(package_dir, max_batch=len(images), wait_ms=300)
    got = concurrently(predictor.probabilities, images)
    for want, have in zip(expected, got):
        np.testing.assert_allclose(have, want, atol=1e-5)
    assert sum(recording.sizes) == len(images) and len(recording.sizes) < len(images)
    assert predictor.session.stats.mean_batch > 1


def test_max_batch_holds_and_shapes_are_never_mixed(package_dir, images):
    predictor, recording = batching_predictor(package_dir, max_batch=4, wait_ms=200)
    wide = [np.ascontiguousarray(np.pad(x, ((0, 0), (0, 0), (0, 0), (0, 12)))) for x in images[:4]]
    inputs = images[:8] + wide
    expected = [Predictor(load_package(package_dir), threads=1).probabilities(x) for x in inputs]
    got = concurrently(predictor.probabilities, inputs)
    for want, have in zip(expected, got):
        np.testing.assert_allclose(have, want, atol=1e-5)
    assert max(recording.sizes) <= 4 and sum(recording.sizes) == len(inputs)


def test_a_bad_input_fails_only_its_own_request(package_dir, images):
    predictor, recording = batching_predictor(package_dir, max_batch=8, wait_ms=300)
    poisoned = np.full_like(images[0], -1)
    outcomes = concurrently(lambda x: _outcome(predictor.probabilities, x), images[:5] + [poisoned])
    assert isinstance(outcomes[-1], RuntimeError) and "poisoned" in str(outcomes[-1])
    assert all(isinstance(o, np.ndarray) and o.shape == (1, 2) for o in outcomes[:-1])
    assert recording.sizes[0] > 1  # the stacked call failed first, then each ran alone


def _outcome(fn, x):
    try:
        return fn(x)
    except RuntimeError as err:
        return err


def test_a_multi_frame_call_larger_than_max_batch_runs_alone(package_dir, images):
    predictor, recording = batching_predictor(package_dir, max_batch=4, wait_ms=0)
    frames = np.concatenate(images[:6])
    assert predictor.probabilities(frames).shape == (6, 2) and recording.sizes == [6]


def test_close_stops_the_worker(package_dir):
    session = BatchingSession(Predictor(load_package(package_dir), threads=1).session, max_batch=4, wait_ms=1)
    session.close()
    assert not session._worker.is_alive()
    with pytest.raises(ValueError):
        BatchingSession(session.session, max_batch=0)


@pytest.mark.parametrize("wait_ms", [1e13, float("inf"), float("nan")])
def test_a_wait_no_thread_can_time_is_refused_before_any_call_is_queued(package_dir, wait_ms):
    session = Predictor(load_package(package_dir), threads=1).session
    # not a number, or longer than a thread can time: the worker's first timed wait would raise, and its call wait forever
    with pytest.raises(ValueError, match="wait_ms"):
        BatchingSession(session, max_batch=2, wait_ms=wait_ms).close()
    parser = argparse.ArgumentParser()
    add_batching_options(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--batch-wait-ms", str(wait_ms)])


def test_http_service_with_batching_answers_each_file(package_dir):
    from medtriage.serve.http import create_app

    predictor = Predictor(load_package(package_dir), threads=1, allow_out_of_scope=True)
    enable_batching(predictor, max_batch=8, wait_ms=100)
    files = [get_testdata_file(n) for n in ("CT_small.dcm", "MR_small.dcm")] * 4
    expected = {f: predictor.score_file(f)[0].probability for f in files[:2]}

    bodies = [Path(f).read_bytes() for f in files]

    async def post_all():
        transport = httpx.ASGITransport(app=create_app(predictor))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await asyncio.gather(
                *[client.post("/v1/score", content=body, headers={"content-type": "application/dicom"}) for body in bodies]
            )

    responses = asyncio.run(post_all())
    for f, response in zip(files, responses):
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["probability"] == pytest.approx(expected[f], abs=1e-5)


def test_batching_lets_enough_requests_in_to_fill_a_batch():
    from medtriage.serve.admission import default_workers

    assert concurrent_requests(None, 1) is None  # batching off: the admission default
    assert concurrent_requests(3, 16) == 3  # an explicit --max-concurrent wins
    assert concurrent_requests(None, 16) == max(16, default_workers())


def test_the_batchers_counters_are_published_for_metrics(package_dir, images):
    from prometheus_client import CollectorRegistry, generate_latest

    predictor, recording = batching_predictor(package_dir, max_batch=4, wait_ms=300)
    registry = CollectorRegistry()
    predictor.session.expose(registry)
    concurrently(predictor.probabilities, images[:8])
    text = generate_latest(registry).decode()
    assert f"medtriage_batch_calls_total {float(len(recording.sizes))}" in text
    assert "medtriage_batch_images_total 8.0" in text and len(recording.sizes) < 8


def test_failed_inference_calls_are_published_for_metrics(package_dir, images):
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    predictor, recording = batching_predictor(package_dir, max_batch=8, wait_ms=300)
    registry = CollectorRegistry()
    predictor.session.expose(registry)
    concurrently(lambda x: _outcome(predictor.probabilities, x), images[:5] + [np.full_like(images[0], -1)])
    samples = {s.name: s.value for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples}
    assert samples.get("medtriage_batch_failed_calls_total", 0) >= 1  # the poisoned input's call, stacked or alone
    assert samples["medtriage_batch_calls_total"] + samples["medtriage_batch_failed_calls_total"] == len(recording.sizes)


def test_an_idle_batcher_holds_no_request_pixels(package_dir, images):
    """Before, the worker kept its last window's calls while it waited for the next one: after a burst of full-size
    images, a quiet service held a whole batch of them (and malloc_trim after the request could free none)."""
    import time
    import weakref

    predictor, _ = batching_predictor(package_dir, max_batch=4, wait_ms=0)
    pixels = [x.copy() for x in images[:4]]
    kept = [weakref.ref(x) for x in pixels]
    concurrently(predictor.probabilities, pixels)
    del pixels
    deadline = time.monotonic() + 10  # the worker drops them as it goes back to wait, just after the answers
    while any(ref() is not None for ref in kept) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(ref() is None for ref in kept)
    predictor.session.close()
