"""Calibration at its edges: a temperature asked of one class only, and confidences exactly on a bin edge or at 1."""

from __future__ import annotations

import numpy as np
import pytest

from medtriage.evaluation.calibration import confidence_bin_index, confidence_bins, expected_calibration_error, fit_temperature
from medtriage.evaluation.metrics import EvaluationInputError

RNG = np.random.default_rng(0)
BINARY_LOGITS = RNG.normal(0, 2, (50, 2))


@pytest.mark.parametrize("only", [0, 1])
def test_a_temperature_is_not_fitted_on_labels_of_one_class(only):
    # a fit would end at T=20 for class 0 and T=6.4 for class 1 on these logits: numbers with no meaning
    with pytest.raises(EvaluationInputError, match=f"all 50 images are of class {only}") as refused:
        fit_temperature(BINARY_LOGITS, np.full(50, only))
    assert refused.value.where == "validation split" and "two classes" in refused.value.hint


def test_the_refusal_names_the_cases_the_caller_fitted_on():
    with pytest.raises(EvaluationInputError) as refused:
        fit_temperature(BINARY_LOGITS, np.zeros(50, int), where="calibration fold 3")
    assert refused.value.where == "calibration fold 3"


def test_a_temperature_is_still_fitted_when_some_classes_of_many_are_absent():
    logits = RNG.normal(0, 1, (60, 3)) + 2.0 * np.eye(3)[np.arange(60) % 2]
    assert 0.05 <= fit_temperature(logits, np.arange(60) % 2) <= 20.0


@pytest.mark.parametrize("n_bins", [1, 7, 15, 49])
def test_every_bin_edge_falls_in_the_bin_it_opens_and_one_in_the_last(n_bins):
    edges = np.arange(n_bins + 1) / n_bins
    expected = np.minimum(np.arange(n_bins + 1), n_bins - 1)
    np.testing.assert_array_equal(confidence_bin_index(edges, n_bins), expected)
    # the values beside each edge stay on their own side of it
    below, above = np.nextafter(edges[1:], 0), np.nextafter(edges[:-1], 1)
    np.testing.assert_array_equal(confidence_bin_index(below, n_bins), np.arange(n_bins))
    np.testing.assert_array_equal(confidence_bin_index(above, n_bins), np.arange(n_bins))


@pytest.mark.parametrize("n_bins", [15, 49, 50])
def test_a_confidence_on_an_edge_shares_its_bin_with_those_just_above_not_below(n_bins):
    # 29/50 * 50 rounds to 28.999...: a floor of it would put 0.58 alone in the bin below the one it opens
    for k in range(n_bins // 2 + 1, n_bins):  # above 1/2, where the first column stays the top label
        edge = k / n_bins
        confidences = np.array([np.nextafter(edge, 0), edge, np.nextafter(edge, 1)])
        _, _, counts = confidence_bins(np.stack([confidences, 1 - confidences], axis=1), np.zeros(3, int), n_bins)
        assert counts.tolist() == [1, 2], f"edge {k}/{n_bins}"


def test_the_ece_of_a_confidence_on_an_edge_is_that_of_the_bin_it_opens():
    probs = np.array([[0.58, 0.42], [0.41, 0.59]])  # both in [0.58, 0.60) of 50 bins
    labels = np.array([0, 0])  # the first right, the second wrong
    assert expected_calibration_error(probs, labels, n_bins=50) == pytest.approx((0.58 + 0.59) / 2 - 0.5)


def test_a_confidence_of_one_counts_in_the_last_bin():
    probs = np.array([[1.0, 0.0], [0.0, 1.0], [0.95, 0.05]])
    confidence, accuracy, counts = confidence_bins(probs, np.array([0, 0, 0]), n_bins=15)
    assert counts.tolist() == [3] and accuracy == pytest.approx([2 / 3])
