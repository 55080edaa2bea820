"""Evaluation statistics at their edges: tied scores, non-finite inputs and images that share a patient."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from medtriage.errors import InputError
from medtriage.evaluation.bootstrap import bootstrap_auc_ci, bootstrap_auc_difference_ci
from medtriage.evaluation.calibration import expected_calibration_error, fit_temperature, probabilities
from medtriage.evaluation.metrics import auc, evaluate
from medtriage.evaluation.operating_points import choose_threshold
from medtriage.evaluation.reliability import confidence_bins


def test_auc_of_tied_scores_is_the_mann_whitney_statistic_with_ties_counted_half():
    rng = np.random.default_rng(0)
    labels, scores = rng.integers(0, 2, 200), np.round(rng.random(200), 1)  # eleven distinct values: many ties
    u = mannwhitneyu(scores[labels == 1], scores[labels == 0]).statistic
    expected = u / ((labels == 1).sum() * (labels == 0).sum())
    assert auc(labels, np.stack([1 - scores, scores], axis=1)) == pytest.approx(expected)


NAN_SCORES = np.array([0.9, np.nan, 0.2, 0.7])
LABELS = np.array([1, 0, 0, 1])
INF_LOGITS = np.array([[0.0, 1.0], [0.0, np.inf], [0.0, -1.0], [0.0, 2.0]])


@pytest.mark.parametrize(
    "call",
    [
        lambda: expected_calibration_error(np.stack([1 - NAN_SCORES, NAN_SCORES], axis=1), LABELS),
        lambda: confidence_bins(np.stack([1 - NAN_SCORES, NAN_SCORES], axis=1), LABELS),
        lambda: evaluate(INF_LOGITS, LABELS, np.array(["a"] * 4), "val"),
        lambda: fit_temperature(INF_LOGITS, LABELS),
        lambda: bootstrap_auc_ci(LABELS, NAN_SCORES, 10),
        lambda: bootstrap_auc_difference_ci(LABELS, np.nan_to_num(NAN_SCORES), NAN_SCORES, 10),
        lambda: choose_threshold(NAN_SCORES, LABELS, "youden"),
    ],
    ids=["ece", "reliability", "evaluate", "temperature", "bootstrap", "bootstrap-baseline", "threshold"],
)
def test_non_finite_scores_are_refused_with_where_they_are(call):
    with pytest.raises(InputError, match=r"not finite.*index 1"):
        call()


@pytest.mark.parametrize("temperature", [0.0, -1.5, np.nan, np.inf])
def test_a_temperature_that_is_not_positive_and_finite_is_refused(temperature):
    with pytest.raises(InputError, match="temperature"):
        probabilities(INF_LOGITS[[0, 2]], temperature)


def test_ece_refuses_labels_that_do_not_match_the_probabilities():
    with pytest.raises(InputError, match="3 labels for 2 rows"):
        expected_calibration_error(np.array([[0.2, 0.8], [0.3, 0.7]]), np.array([1, 0, 1]))


def test_a_patient_level_interval_of_repeated_images_is_that_of_one_image_per_patient():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 120)
    scores = labels * 0.8 + rng.normal(0, 1, 120)
    repeats = 5  # every patient imaged five times, all five scored alike
    patients = np.repeat(np.arange(120), repeats)
    per_image = bootstrap_auc_ci(np.repeat(labels, repeats), np.repeat(scores, repeats), 200, groups=patients)
    assert per_image == bootstrap_auc_ci(labels, scores, 200)
    # resampled image by image, the repeats pass for independent cases and the interval shrinks by about sqrt(5)
    low, high = bootstrap_auc_ci(np.repeat(labels, repeats), np.repeat(scores, repeats), 200)
    assert high - low < 0.6 * (per_image[1] - per_image[0])
    # one patient per image is the image-level interval, and a paired interval resamples patients alike
    assert bootstrap_auc_ci(labels, scores, 200, groups=np.arange(120)[::-1]) == bootstrap_auc_ci(labels, scores, 200)
    paired = bootstrap_auc_difference_ci(
        np.repeat(labels, repeats), np.repeat(scores, repeats), np.zeros(600) + patients, 200, groups=patients
    )
    assert paired == bootstrap_auc_difference_ci(labels, scores, np.arange(120.0), 200)


def test_groups_must_name_one_patient_per_image():
    with pytest.raises(InputError, match="4 groups for 3 images"):
        bootstrap_auc_ci(np.array([0, 1, 1]), np.array([0.1, 0.2, 0.3]), 10, groups=np.arange(4))


def test_a_temperature_fit_that_finds_no_minimum_before_its_bound_says_so(caplog):
    from medtriage.evaluation.calibration import TEMPERATURE_BOUNDS, fit_temperature

    separated = np.array([[2.0, -2.0]] * 20 + [[-2.0, 2.0]] * 20)
    labels = np.array([0] * 20 + [1] * 20)
    with caplog.at_level("WARNING", logger="medtriage.evaluation.calibration"):
        temperature = fit_temperature(separated, labels)
    assert TEMPERATURE_BOUNDS[0] <= temperature < 0.1
    assert "perfectly separated" in caplog.text
    caplog.clear()
    noisy = np.random.default_rng(0).normal(size=(200, 2)) + np.array([[0.0, 1.0]]) * labels.repeat(5)[:, None]
    with caplog.at_level("WARNING", logger="medtriage.evaluation.calibration"):
        fit_temperature(noisy, labels.repeat(5))
    assert "no minimum" not in caplog.text  # an ordinary fit finds its minimum inside the bounds
