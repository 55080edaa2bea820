"""The reliability diagram shows every bin, whatever the number of classes."""

import numpy as np

from medtriage.evaluation.calibration import confidence_bins, probabilities
from medtriage.evaluation.reliability import confidence_axis, plot_reliability


def test_the_confidence_axis_holds_every_bin_of_a_three_class_model(tmp_path):
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(0, 0.3, (300, 3)), rng.integers(0, 3, 300)
    confidence, _, _ = confidence_bins(probabilities(logits), labels)
    low, high = confidence_axis(3)
    assert low < confidence.min() and confidence.max() <= high
    path = plot_reliability(logits, labels, 1.5, tmp_path / "plots" / "reliability.png", "three classes")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and list(path.parent.iterdir()) == [path]


def test_a_binary_axis_starts_below_one_half():
    assert confidence_axis(2)[0] < 0.5
