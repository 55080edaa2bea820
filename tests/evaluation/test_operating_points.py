import numpy as np
import pytest

from medtriage.errors import ConfigError, InputError
from medtriage.evaluation.operating_points import choose_threshold, priority_thresholds


@pytest.fixture
def scored():
    rng = np.random.default_rng(1)
    labels = rng.random(600) < 0.4
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.15), 0, 1)
    return scores, labels


def rates(scores, labels, threshold):
    predicted = scores >= threshold
    return predicted[labels].mean(), (~predicted[~labels]).mean()


def test_sensitivity_rule_picks_the_highest_threshold_reaching_the_target(scored):
    scores, labels = scored
    point = choose_threshold(scores, labels, "sensitivity", 0.95)
    sensitivity, specificity = rates(scores, labels, point.threshold)
    assert sensitivity >= 0.95
    assert (point.sensitivity, point.specificity) == pytest.approx((sensitivity, specificity))
    next_up = scores[scores > point.threshold].min()
    assert rates(scores, labels, next_up)[0] < 0.95  # any higher threshold misses the target


def test_specificity_rule_picks_the_lowest_threshold_keeping_the_target(scored):
    scores, labels = scored
    point = choose_threshold(scores, labels, "specificity", 0.9)
    assert rates(scores, labels, point.threshold)[1] >= 0.9
    next_down = scores[scores < point.threshold].max()
    assert rates(scores, labels, next_down)[1] < 0.9


def test_youden_maximises_sensitivity_plus_specificity(scored):
    scores, labels = scored
    point = choose_threshold(scores, labels, "youden")
    best = max(sum(rates(scores, labels, t)) for t in np.unique(scores))
    assert point.sensitivity + point.specificity == pytest.approx(best)


def test_urgent_never_sits_below_review(scored):
    scores, labels = scored
    review = choose_threshold(scores, labels, "sensitivity", 0.5)
    urgent = choose_threshold(scores, labels, "sensitivity", 0.9)  # lower threshold than review
    block = priority_thresholds(review, urgent)
    assert block["urgent"]["threshold"] == review.threshold
    assert "clamped" in block["urgent"]["note"]


def test_bad_rules_and_single_class_validation_are_refused(scored):
    scores, labels = scored
    with pytest.raises(ConfigError, match="unknown threshold rule"):
        choose_threshold(scores, labels, "accuracy", 0.9)
    with pytest.raises(ConfigError, match="target"):
        choose_threshold(scores, labels, "sensitivity", None)
    with pytest.raises(InputError, match="single class"):
        choose_threshold(scores, np.ones_like(labels), "youden")
