"""Metrics and drift under pressure: a full table of sources keeps the one that drifts (and its alert), rejection
reasons read as words, and untrusted X-Source text cannot break the exposition."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from medtriage.serve.drift import MAX_SOURCES
from medtriage.serve.metrics import ServiceMonitor
from medtriage.serve.predictor import Predictor, Rejection
from tests.serve.test_drift import SHIFTS, decoded, outcome
from tests.serve.test_drift import held_out as held_out  # noqa: F401 -- the module fixture


@pytest.fixture(scope="module")
def predictor(safe_predictor) -> Predictor:
    """The package that carries an OOD output and drift references."""
    return safe_predictor


def series(monitor: ServiceMonitor, name: str) -> dict:
    """`name`'s samples in the exposition, read back by Prometheus' own parser: labels -> value."""
    text = monitor.exposition().decode()
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def test_a_new_source_does_not_evict_a_drifting_one_when_every_window_is_full(predictor, held_out):
    steady = [outcome(predictor, decoded(pixels, i), f"img{i}") for i, pixels in enumerate(held_out[:100])]
    shifted = [outcome(predictor, decoded(SHIFTS["inverted photometric"](p), i), f"inv{i}") for i, p in enumerate(held_out[:100])]
    monitor = ServiceMonitor(predictor.package)
    for scores in shifted:  # the drifting source is the least recently seen of all
        monitor.record(scores, "CR_ROOM_1", 0.01)
    assert monitor.drift.drifting("CR_ROOM_1")
    for room in range(MAX_SOURCES - 1):  # every other source has a window long enough to alert, and does not
        for scores in steady:
            monitor.record(scores, f"DX_ROOM_{room}", 0.01)
    assert monitor.drift.status()["drifting"] == ["CR_ROOM_1"]
    monitor.record(steady[0], "NEW_ROOM", 0.01)
    assert monitor.drift.drifting("CR_ROOM_1"), "a new name pushed out the drifting source"
    assert "DX_ROOM_0" not in monitor.drift.sources() and "NEW_ROOM" in monitor.drift.sources()
    alerts = series(monitor, "medtriage_drift_alert")
    assert alerts[(("source", "CR_ROOM_1"),)] == 1.0 and len(alerts) == MAX_SOURCES


def test_rejection_reasons_of_acronym_error_types_read_as_words(predictor):
    monitor = ServiceMonitor(predictor.package)
    for error in ("OSError", "JSONDecodeError", "DicomError"):  # e.g. an internal error while scoring
        monitor.record(Rejection("a.dcm", "failed", error), "CR_ROOM_1", 0.01)
    reasons = {dict(labels)["reason"] for labels in series(monitor, "medtriage_rejected_total")}
    assert reasons == {"os_error", "json_decode_error", "dicom_error"}


def test_untrusted_source_names_keep_the_exposition_parseable(predictor, held_out):
    scores = outcome(predictor, decoded(held_out[0], 0), "img0")
    monitor = ServiceMonitor(predictor.package)
    for source in ('CR "ROOM" \\ 2 {x="1"}', "line\nbreak", "\\", "é"):  # what an X-Source header may carry
        monitor.record(scores, source, 0.01)
    sources = {dict(labels)["source"] for labels in series(monitor, "medtriage_drift_alert")}
    assert sources == {"CR _ROOM_ _ 2 _x__1__", "line_break", "_"} == monitor.drift.sources()
    assert series(monitor, "medtriage_scoring_seconds_bucket")[(("le", "+Inf"),)] == 4.0
