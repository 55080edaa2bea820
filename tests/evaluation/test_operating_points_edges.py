"""Edge cases of the operating-point rules: ties among validation scores, all scores tied, and a specificity target
that no threshold on the validation scores can keep."""

import numpy as np
import pytest

from medtriage.errors import InputError
from medtriage.evaluation.operating_points import choose_priority_thresholds, choose_threshold


def rates(scores, labels, threshold):
    predicted = scores >= threshold
    return predicted[labels].mean(), (~predicted[~labels]).mean()


def test_tied_scores_count_every_tied_case_on_the_same_side():
    scores = np.array([0.9, 0.7, 0.7, 0.7, 0.7, 0.2, 0.1])
    labels = np.array([1, 1, 0, 1, 0, 1, 0], dtype=bool)
    point = choose_threshold(scores, labels, "sensitivity", 0.7)
    assert point.threshold == 0.7
    assert (point.sensitivity, point.specificity) == pytest.approx(rates(scores, labels, point.threshold))
    assert point.sensitivity >= 0.7


@pytest.mark.parametrize(("rule", "target"), [("sensitivity", 0.9), ("youden", None)])
def test_all_scores_tied_give_a_threshold_in_the_unit_interval(rule, target):
    scores, labels = np.full(6, 0.4), np.array([0, 1, 0, 1, 0, 1], dtype=bool)
    point = choose_threshold(scores, labels, rule, target)
    assert point.threshold == 0.4
    assert (point.sensitivity, point.specificity) == (1.0, 0.0)


def test_choice_does_not_depend_on_the_order_of_cases():
    rng = np.random.default_rng(3)
    scores, labels = np.round(rng.random(300), 2), rng.random(300) < 0.3  # many ties
    order = rng.permutation(300)
    for rule, target in (("sensitivity", 0.9), ("specificity", 0.9), ("youden", None)):
        assert choose_threshold(scores, labels, rule, target) == choose_threshold(scores[order], labels[order], rule, target)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_specificity_target_only_flagging_nothing_keeps_sits_above_every_score(dtype):
    # The top score belongs to a negative: every threshold at a score has specificity <= 2/3.
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.2], dtype=dtype)
    labels = np.array([0, 1, 1, 0, 0], dtype=bool)
    point = choose_threshold(scores, labels, "specificity", 0.95)
    assert scores.max() < point.threshold <= 1.0
    assert (point.sensitivity, point.specificity) == (0.0, 1.0) == rates(scores, labels, point.threshold)
    block = choose_priority_thresholds(scores, labels, "sensitivity", 0.95, "specificity", 0.95)
    assert block["urgent"]["threshold"] == point.threshold and block["urgent"]["specificity"] >= 0.95


def test_a_specificity_target_no_threshold_in_the_unit_interval_keeps_is_refused():
    scores = np.array([1.0, 1.0, 0.7, 0.6, 0.2])  # a negative saturates at 1.0: only a threshold above 1 would keep it
    labels = np.array([0, 1, 1, 0, 0], dtype=bool)
    with pytest.raises(InputError, match="specificity"):
        choose_threshold(scores, labels, "specificity", 0.95)


def test_a_specificity_target_met_exactly_is_kept():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.2])
    labels = np.array([0, 1, 1, 0, 0], dtype=bool)
    point = choose_threshold(scores, labels, "specificity", 2 / 3)
    assert point.specificity >= 2 / 3 and point.threshold == 0.7
