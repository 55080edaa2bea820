"""The reliability diagram shows every bin, whatever the number of classes; a bin count that makes no bins is refused."""

import numpy as np
import pytest

from medtriage.errors import InputError
from medtriage.evaluation.calibration import confidence_bins, expected_calibration_error, probabilities
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


@pytest.mark.parametrize("n_bins", [0, -3, 2.5])
def test_a_bin_count_below_one_or_not_whole_is_refused(n_bins):
    probs, labels = np.array([[0.2, 0.8], [0.6, 0.4]]), np.array([1, 0])
    with pytest.raises(InputError, match="confidence bins"):
        expected_calibration_error(probs, labels, n_bins)
