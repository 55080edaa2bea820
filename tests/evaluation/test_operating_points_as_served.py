"""An operating point's sensitivity and specificity are those serving gives its validation images: served
probabilities and thresholds are float32 (serve.package.served_threshold), the scores it was chosen on float64."""

from types import SimpleNamespace

import numpy as np
import pytest

from medtriage.evaluation.assess import assess
from medtriage.evaluation.calibration import probabilities
from medtriage.evaluation.operating_points import choose_threshold
from medtriage.serve.package import served_threshold


def served_rates(scores, labels, threshold):
    flagged = np.asarray(scores).astype(np.float32) >= np.float32(served_threshold(threshold))
    assert (flagged == (scores >= threshold)).all()  # the float64 scores meet the recorded threshold alike
    return flagged[labels].mean(), (~flagged[~labels]).mean()


def test_a_specificity_target_kept_by_flagging_nothing_flags_nothing_as_served():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.2])  # float64; a negative holds the top score
    labels = np.array([0, 1, 1, 0, 0], dtype=bool)
    point = choose_threshold(scores, labels, "specificity", 0.95)
    assert (point.sensitivity, point.specificity) == (0.0, 1.0) == served_rates(scores, labels, point.threshold)


@pytest.mark.parametrize(("rule", "target"), [("sensitivity", 0.9), ("specificity", 0.9), ("youden", None)])
def test_scores_float32_cannot_tell_apart_are_counted_as_served(rule, target):
    # Pairs of scores 1e-10 apart: distinct in float64, one value in float32. The positive of each pair is the higher.
    rng = np.random.default_rng(0)
    base = np.round(rng.uniform(0.05, 0.95, 150), 3)
    scores = np.concatenate([base, base + 1e-10])
    labels = np.concatenate([rng.random(150) < 0.2, np.ones(150, dtype=bool)])
    point = choose_threshold(scores, labels, rule, target)
    assert (point.sensitivity, point.specificity) == pytest.approx(served_rates(scores, labels, point.threshold))


def binary(margins) -> SimpleNamespace:
    margins = np.asarray(margins, dtype=np.float64)
    return SimpleNamespace(logits=np.stack([np.zeros_like(margins), margins], axis=1), labels=(margins > 10).astype(int))


def test_assessed_test_figures_at_an_operating_point_are_those_served():
    # A confident model: positives' logit margins past 17.33, where float32 serves p(positive) as 1.0. The test
    # positives score a little below every validation positive in float64, and are served as they are.
    rng = np.random.default_rng(0)
    val = binary(np.concatenate([rng.uniform(-4, 0, 20), rng.uniform(17.5, 25, 20)]))
    test = binary(np.concatenate([rng.uniform(-4, 0, 10), rng.uniform(17.34, 17.45, 10)]))
    result = assess(val, test, 1.0, n_resamples=20)
    served = probabilities(test.logits)[:, 1].astype(np.float32)
    assert (served[10:] == 1.0).all()
    for key in ("sens95", "youden"):
        flagged = served >= np.float32(served_threshold(result[f"{key}_threshold"]))
        assert result[f"test_sens_{key}"] == flagged[10:].mean() == 1.0
        assert result[f"test_spec_{key}"] == (~flagged[:10]).mean()


def test_a_packages_recorded_figures_count_what_serving_flags():
    """export.package.split_metrics: the sensitivity model.json records is the one served at its threshold."""
    from medtriage.export.package import binary_metrics

    below_in_float64 = np.nextafter(0.5, 0.0)  # float32 cannot tell it from 0.5: served, it is flagged
    figures = binary_metrics(np.array([below_in_float64, 0.9, 0.1]), np.array([1, 1, 0]), 0.5)
    assert (figures["sensitivity"], figures["specificity"]) == (1.0, 1.0)
