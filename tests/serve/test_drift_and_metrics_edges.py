"""Drift watch edges: a multi-frame object counts as one input (it cannot raise an alert alone), a
stream of one-off source names cannot push a drifting source, and its alert, out of the monitor, nor a
source still filling its window, out-of-scope images scored anyway do not feed it, and a package
without references shows no threshold."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from medtriage.serve.drift import MAX_SOURCES
from medtriage.serve.metrics import ServiceMonitor
from medtriage.serve.package import load_package
from medtriage.serve.predictor import Predictor
from tests.serve.test_drift import SHIFTS, decoded, outcome, stream
from tests.serve.test_drift import held_out as held_out  # noqa: F401 -- the module fixture
from tests.serve.test_scope import with_meta


@pytest.fixture(scope="module")
def predictor(safe_predictor) -> Predictor:
    """The package that carries an OOD output and drift references."""
    return safe_predictor


def test_one_multiframe_object_does_not_raise_an_alert(predictor, held_out):
    still = decoded(held_out[0], 0)
    cine = replace(still, pixels=np.repeat(still.pixels, 120, axis=0), frames=120)  # a static 120-frame cine
    scores = outcome(predictor, cine, "cine.dcm")
    assert len(scores) == 120 > predictor.package.meta["drift"]["min_images"]
    monitor = ServiceMonitor(predictor.package)
    monitor.record(scores, "US_ROOM_1", 0.1)
    (state,) = monitor.drift.status()["sources"]
    assert state["window"] == 1 and state["images"] == 1 and not state["drifting"], state
    assert 'medtriage_drift_alert{source="US_ROOM_1"} 0.0' in monitor.exposition().decode()


def test_one_off_source_names_do_not_evict_a_drifting_source(predictor, held_out):
    monitor = ServiceMonitor(predictor.package)
    stream(predictor, held_out[:120], "CR_ROOM_1", monitor, SHIFTS["inverted photometric"])
    assert monitor.drift.drifting("CR_ROOM_1")
    one = outcome(predictor, decoded(held_out[0], 0), "img0")
    for i in range(MAX_SOURCES):  # e.g. a client that puts a request id in X-Source
        monitor.record(one, f"upload-{i}", 0.01)
    assert monitor.drift.drifting("CR_ROOM_1"), monitor.drift.status()["drifting"]
    assert 'medtriage_drift_alert{source="CR_ROOM_1"} 1.0' in monitor.exposition().decode()
    assert len(monitor.drift.sources()) == MAX_SOURCES


def test_out_of_scope_images_scored_anyway_do_not_feed_drift(safe_package_dir, held_out, tmp_path):
    scoped = load_package(with_meta(safe_package_dir, tmp_path / "chest", scope={"modalities": ["CR", "DX"]}))
    anyway = Predictor(scoped, threads=1, allow_out_of_scope=True)
    monitor = ServiceMonitor(scoped)
    ultrasound = replace(decoded(held_out[0], 0), modality="US")
    scores = outcome(anyway, ultrasound, "us.dcm")
    assert [flag.split(":")[0] for flag in scores[0].flags] == ["out_of_scope"]
    monitor.record(scores, "US_ROOM_1", 0.01)
    monitor.record(outcome(anyway, decoded(held_out[1], 1), "cr.dcm"), "CR_ROOM_1", 0.01)
    assert [state["source"] for state in monitor.drift.status()["sources"]] == ["CR_ROOM_1"]
    assert monitor.registry.get_sample_value("medtriage_scored_total") == 2  # both were scored, and counted


def test_a_package_without_drift_references_shows_no_psi_threshold(predictor, package_dir):
    plain = ServiceMonitor(load_package(package_dir))
    assert not plain.drift.enabled and b"medtriage_drift_psi_threshold" not in plain.exposition()
    threshold = predictor.package.meta["drift"]["psi_threshold"]
    assert ServiceMonitor(predictor.package).registry.get_sample_value("medtriage_drift_psi_threshold") == threshold


def test_one_off_source_names_do_not_keep_a_new_source_from_filling_its_window(predictor, held_out):
    monitor = ServiceMonitor(predictor.package)
    one = outcome(predictor, decoded(held_out[0], 0), "img0")
    inverted = [outcome(predictor, decoded(SHIFTS["inverted photometric"](p), i), f"inv{i}") for i, p in enumerate(held_out[:120])]
    uploads = 0
    for study in range(0, len(inverted), 4):  # a room sends studies of four images ...
        for scores in inverted[study : study + 4]:
            monitor.record(scores, "CR_ROOM_1", 0.01)
        for _ in range(2 * MAX_SOURCES):  # ... and between two of them, a client that puts a request id in X-Source
            monitor.record(one, f"upload-{uploads}", 0.01)
            uploads += 1
    state = next((s for s in monitor.drift.status()["sources"] if s["source"] == "CR_ROOM_1"), None)
    assert state is not None and state["window"] == 120, f"one-off names pushed out a source of 120 images: {state}"
    assert monitor.drift.drifting("CR_ROOM_1")
