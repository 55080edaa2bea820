"""AUC, ROC points, per-split metrics and the OOD threshold refuse inputs they cannot mean anything on, with what is
wrong, instead of a number computed on them or a scikit-learn or numpy error."""

from __future__ import annotations

import numpy as np
import pytest

from medtriage.errors import InputError
from medtriage.evaluation.metrics import auc, classification_metrics, roc_points
from medtriage.evaluation.operating_points import flagging_threshold

LABELS = np.array([0, 1, 1])
NAN_PROBS = np.array([[0.2, 0.8], [np.nan, 0.5], [0.5, 0.5]])
PROBS = np.array([[0.8, 0.2], [0.3, 0.7], [0.5, 0.5]])


@pytest.mark.parametrize("call", [auc, roc_points], ids=["auc", "roc"])
def test_probabilities_that_are_not_finite_are_refused_not_ranked(call):
    # scikit-learn ranks a NaN among the scores: AUC 0.0 here, and a ROC curve through it
    with pytest.raises(InputError, match=r"not finite.*index 1, 0"):
        call(LABELS, NAN_PROBS)


@pytest.mark.parametrize(
    ("labels", "match"),
    [(np.array([0, 1, 2]), "not class numbers of a 2-class model"), (np.array([0, 1]), "2 labels for 3 images")],
    ids=["third-class", "length"],
)
@pytest.mark.parametrize("call", [auc, roc_points], ids=["auc", "roc"])
def test_labels_that_are_not_one_class_per_row_are_refused_by_name(call, labels, match):
    with pytest.raises(InputError, match=match):
        call(labels, PROBS)


def test_an_auc_of_one_class_is_undefined_not_an_error():
    assert auc(np.array([1, 1, 1]), PROBS) is None and roc_points(np.array([0, 0, 0]), PROBS) is None


def test_metrics_of_logits_are_refused_as_not_probabilities():
    # scikit-learn refuses them deep in its log-loss, saying neither which input nor what to pass instead
    with pytest.raises(InputError, match="not probabilities"):
        classification_metrics(LABELS, np.array([[3.0, -2.0], [-1.0, 5.0], [0.0, 0.0]]))


@pytest.mark.parametrize("rate", [1.5, -0.1, float("nan")])
def test_an_ood_false_alarm_rate_outside_zero_to_one_is_refused_by_name(rate):
    with pytest.raises(InputError, match="false-alarm rate"):
        flagging_threshold(np.arange(10.0), rate)
