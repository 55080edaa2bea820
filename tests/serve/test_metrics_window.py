"""The exposition carries each source's window size and the size it must reach before its PSI can alert, so that
a rule on the PSI itself does not fire on a new source's first images."""

from __future__ import annotations

import pytest

from medtriage.serve.metrics import ServiceMonitor
from medtriage.serve.predictor import Predictor
from tests.serve.test_drift import decoded, outcome
from tests.serve.test_drift import held_out as held_out  # noqa: F401 -- the module fixture
from tests.serve.test_metrics_sources import series


@pytest.fixture(scope="module")
def predictor(safe_predictor) -> Predictor:
    return safe_predictor


def test_a_new_sources_psi_comes_with_its_window_and_the_size_it_needs(predictor, held_out):
    monitor = ServiceMonitor(predictor.package)
    for i, pixels in enumerate(held_out[:3]):
        monitor.record(outcome(predictor, decoded(pixels, i), f"img{i}"), "CR_ROOM_1", 0.01)
    (min_images,) = series(monitor, "medtriage_drift_min_images").values()
    assert series(monitor, "medtriage_drift_window") == {(("source", "CR_ROOM_1"),): 3.0}
    assert min_images == monitor.drift.min_images > 3
    psi = series(monitor, "medtriage_drift_psi")
    assert max(psi.values()) > monitor.drift.threshold  # three images are far from any reference by chance ...
    assert series(monitor, "medtriage_drift_alert") == {(("source", "CR_ROOM_1"),): 0.0}  # ... and do not alert
