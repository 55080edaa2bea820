"""Inputs the evaluation statistics cannot mean anything on are refused with what is wrong; valid but unusual ones
(integer scores) are scored as their float values would be."""

from __future__ import annotations

import numpy as np
import pytest

from medtriage.errors import InputError
from medtriage.evaluation.bootstrap import bootstrap_auc_ci, mean_sd
from medtriage.evaluation.calibration import expected_calibration_error, fit_temperature
from medtriage.evaluation.metrics import softmax
from medtriage.evaluation.operating_points import choose_threshold, flagging_threshold

SCORES = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.1])
LABELS = np.array([1, 0, 1, 0, 1, 0])


@pytest.mark.parametrize(("rule", "target"), [("youden", None), ("sensitivity", 0.9), ("specificity", 0.6)])
def test_integer_scores_choose_the_threshold_their_float_values_do(rule, target):
    hard = np.array([1, 1, 0, 0, 1, 0])  # a 0/1 rule scored as integers
    assert choose_threshold(hard, LABELS, rule, target) == choose_threshold(hard.astype(np.float64), LABELS, rule, target)


def test_scores_outside_the_unit_interval_are_refused_as_not_probabilities():
    logits = np.array([3.0, 2.5, -1.0, -2.0, 0.5, -3.0])  # logits passed where probabilities belong
    for rule, target in (("youden", None), ("sensitivity", 0.9)):
        with pytest.raises(InputError, match=r"outside \[0, 1\]"):
            choose_threshold(logits, LABELS, rule, target)


@pytest.mark.parametrize("labels", [np.array([0, 1, 2, 0, 1, 2]), np.array([0.0, 0.7, 1.0, 0.0, 1.0, 0.0])])
def test_threshold_labels_that_are_not_binary_are_refused(labels):
    with pytest.raises(InputError, match="binary"):
        choose_threshold(SCORES, labels, "youden")


def test_an_ood_threshold_over_non_finite_or_no_scores_is_refused():
    with pytest.raises(InputError, match="not finite"):
        flagging_threshold(np.array([0.1, np.nan, 0.3]), 0.05)  # was a NaN threshold that flags nothing
    with pytest.raises(InputError, match="no validation scores"):
        flagging_threshold(np.array([]), 0.05)


@pytest.mark.parametrize("logits", [np.array([0.2, 1.5]), np.zeros((3, 1)), np.zeros((2, 2, 2))])
def test_logits_that_are_not_one_row_of_two_or_more_classes_per_image_are_refused(logits):
    with pytest.raises(InputError, match=r"\[images, classes\]"):
        softmax(logits)
    with pytest.raises(InputError, match=r"\[images, classes\]"):
        fit_temperature(logits, np.zeros(len(logits), dtype=int))


def test_ece_of_something_other_than_a_probability_matrix_is_refused():
    labels = np.array([1, 1])
    with pytest.raises(InputError, match=r"\[images, classes\]"):
        expected_calibration_error(np.array([0.2, 0.9]), labels)  # p(positive) alone
    with pytest.raises(InputError, match=r"outside \[0, 1\]"):
        expected_calibration_error(np.array([[-3.0, 2.0], [1.0, 4.0]]), labels)  # logits: was an "ECE" of 2.0
    with pytest.raises(InputError, match="class numbers"):
        expected_calibration_error(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array(["1", "0"]))  # never equal to an argmax


def test_ece_takes_labels_of_any_integer_valued_type_alike():
    probs = np.array([[0.1, 0.9], [0.8, 0.2], [0.45, 0.55]])
    expected = expected_calibration_error(probs, np.array([1, 0, 0]))
    for labels in (np.array([1.0, 0.0, 0.0]), np.array([True, False, False])):
        assert expected_calibration_error(probs, labels) == expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"n_resamples": 0}, "resamples"), ({"level": 95}, "level"), ({"level": 0.0}, "level")],
)
def test_a_bootstrap_that_could_draw_no_interval_is_refused(kwargs, match):
    with pytest.raises(InputError, match=match):
        bootstrap_auc_ci(LABELS, SCORES, **{"n_resamples": 10, **kwargs})


def test_a_bootstrap_auc_of_more_than_two_classes_is_refused():
    with pytest.raises(InputError, match="binary"):
        bootstrap_auc_ci(np.array([0, 1, 2, 0, 1, 2]), SCORES, 10)


def test_mean_sd_of_no_values_is_refused_not_nan():
    with pytest.raises(InputError, match="no values"):
        mean_sd([])
