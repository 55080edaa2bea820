"""Drift: held-out images of the validation population do not alert; the same images with a shifted acquisition do."""

from __future__ import annotations

import numpy as np
import pytest

from medtriage.data.sources.medmnist import as_chw
from medtriage.errors import MedTriageError
from medtriage.format.references import psi, reference_histogram
from medtriage.io.dicom import DecodedImage
from medtriage.io.npz import read_npz
from medtriage.serve.drift import MAX_COUNTED, MAX_SOURCES, DriftMonitor, source_name
from medtriage.serve.metrics import ServiceMonitor
from medtriage.serve.predictor import Predictor, Rejection
from tests.export.tiny_package import NPZ

SHIFTS = {  # another acquisition of the same images
    "inverted photometric": lambda x: 1.0 - x,
    "gamma 2.2": lambda x: x**2.2,
    "narrow window": lambda x: np.clip((x - 0.35) / 0.3, 0.0, 1.0),
}


def decoded(pixels: np.ndarray, index: int) -> DecodedImage:
    """A held-out npz image as the predictor receives a decoded DICOM image."""
    return DecodedImage(
        pixels=pixels[None].astype(np.float32),
        sop_uid=f"1.2.3.{index}",
        study_uid="1.2.3",
        series_uid="1.2.3.1",
        patient_id="",
        modality="CR",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        photometric="MONOCHROME2",
        rows=pixels.shape[-2],
        columns=pixels.shape[-1],
        frames=1,
        bits_stored=8,
        transfer_syntax="",
    )


@pytest.fixture(scope="module")
def predictor(safe_predictor) -> Predictor:
    """This module scores with the package that carries an OOD output and drift references."""
    return safe_predictor


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    images, _ = read_npz(NPZ)["test"]
    return np.stack([as_chw(image) for image in images[:240]])


def outcome(predictor: Predictor, image: DecodedImage, name: str):
    """What a door gets for one image: its scores, or a rejection (an unusual one still carries its features)."""
    try:
        return predictor.score_decoded(image, name)
    except MedTriageError as err:
        return Rejection.of(name, err)


def stream(predictor: Predictor, images: np.ndarray, source: str, monitor: ServiceMonitor, shift=None) -> list[bool]:
    """Score each image as one input from `source`; the drift alert after each image."""
    alerts = []
    for i, pixels in enumerate(images):
        pixels = shift(pixels) if shift else pixels
        monitor.record(outcome(predictor, decoded(pixels, i), f"img{i}"), source, 0.01)
        alerts.append(monitor.drift.drifting(source))
    return alerts


def test_the_package_carries_reference_distributions(predictor):
    drift = predictor.package.meta["drift"]
    assert set(drift["features"]) >= {"input_mean", "probability"}
    assert drift["psi_threshold"] >= 0.25 and drift["reference"]["all"]["input_mean"]["proportions"]
    assert set(drift["reference"]["per_site"]) == {"site-a", "site-b"}


def test_unshifted_stream_does_not_alert(predictor, held_out):
    monitor = ServiceMonitor(predictor.package)
    alerts = stream(predictor, held_out, "CR_ROOM_1", monitor)
    state = monitor.drift.status()["sources"][0]
    assert not any(alerts), state
    assert state["window"] == monitor.drift.window and state["images"] == len(held_out)


@pytest.mark.parametrize("shift", sorted(SHIFTS))
def test_shifted_acquisition_alerts(predictor, held_out, shift):
    monitor = ServiceMonitor(predictor.package)
    stream(predictor, held_out[:120], "CR_ROOM_1", monitor)
    assert not monitor.drift.drifting("CR_ROOM_1")
    alerts = stream(predictor, held_out[120:], "CR_ROOM_1", monitor, SHIFTS[shift])
    assert alerts[-1], monitor.drift.status()
    assert monitor.drift.status()["drifting"] == ["CR_ROOM_1"]
    text = monitor.exposition().decode()
    assert 'medtriage_drift_alert{source="CR_ROOM_1"} 1.0' in text
    assert 'medtriage_drift_psi{feature="input_mean",source="CR_ROOM_1"}' in text


def test_psi_is_small_for_the_same_population_and_large_for_a_shifted_one():
    rng = np.random.default_rng(0)
    reference = reference_histogram(rng.normal(0, 1, 2000))
    assert psi(reference, rng.normal(0, 1, 500)) < 0.05
    assert psi(reference, rng.normal(1, 1, 500)) > 0.5
    assert np.isfinite(psi(reference, np.full(50, 99.0)))  # empty bins do not make it infinite


def test_sources_are_bounded_and_printable():
    assert source_name(None) == "default" and source_name("  ") == "default"
    assert source_name("CR\nROOM{1}") == "CR_ROOM_1_" and len(source_name("x" * 500)) == 64
    monitor = DriftMonitor({"reference": {"all": {"probability": reference_histogram(np.linspace(0, 1, 100))}, "per_site": {}}})
    for i in range(MAX_SOURCES + 10):
        monitor.observe(f"src{i}", {"probability": 0.5})
    assert len(monitor.sources()) == MAX_SOURCES and "src0" not in monitor.sources()


def _steady_monitor(min_images: int) -> DriftMonitor:
    """A monitor whose sources never drift: a window long enough to alert does not keep its source from leaving."""
    reference = {"all": {"probability": reference_histogram(np.linspace(0, 1, 100))}, "per_site": {}}
    return DriftMonitor({"reference": reference, "min_images": min_images, "psi_threshold": 1e9})


def test_a_source_whose_window_was_let_go_counts_on_where_it_left_off():
    """Before, its count started over: a room that had sent five inputs showed one once its window was let go."""
    monitor = _steady_monitor(min_images=2)
    for _ in range(5):
        monitor.observe("CR_ROOM_1", {"probability": 0.5})
    for i in range(MAX_SOURCES):  # every window long enough to alert, none drifting: the least recently seen goes
        for _ in range(2):
            monitor.observe(f"src{i}", {"probability": 0.5})
    assert "CR_ROOM_1" not in monitor.sources()
    monitor.observe("CR_ROOM_1", {"probability": 0.5})
    (state,) = (s for s in monitor.status()["sources"] if s["source"] == "CR_ROOM_1")
    assert (state["images"], state["window"]) == (6, 1)  # every input so far; the window starts empty


def test_counts_of_sources_gone_are_bounded_and_one_off_names_go_first():
    monitor = _steady_monitor(min_images=1)
    for _ in range(3):
        monitor.observe("CR_ROOM_1", {"probability": 0.5})
    for i in range(MAX_COUNTED + MAX_SOURCES):  # e.g. a client that puts a request id in X-Source
        monitor.observe(f"upload-{i}", {"probability": 0.5})
    assert "CR_ROOM_1" not in monitor.sources() and len(monitor._seen) == MAX_COUNTED
    assert monitor.observe("CR_ROOM_1", {"probability": 0.5}).images == 4


def test_a_package_without_references_monitors_nothing(predictor, held_out):
    monitor = DriftMonitor(None)
    assert monitor.observe("a", {"probability": 0.2}) is None and monitor.status()["sources"] == []


def test_rejections_are_counted_by_reason(predictor):
    monitor = ServiceMonitor(predictor.package)
    monitor.record(Rejection("a.dcm", "out of scope: modality 'CT'", "OutOfScopeError", "out_of_scope", "modality"))
    monitor.record(Rejection("b.dcm", "truncated", "DicomError"))
    text = monitor.exposition().decode()
    assert 'medtriage_rejected_total{reason="out_of_scope"} 1.0' in text
    assert 'medtriage_rejected_total{reason="dicom_error"} 1.0' in text
