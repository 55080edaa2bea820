"""The test assessment of a model of three classes is that of the class its package serves: p(positive label), the
last class where export.positive_label names none, against the same thresholds serving applies."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medtriage.evaluation.assess import assess
from medtriage.evaluation.calibration import probabilities
from medtriage.export.run import positive_index

LABEL_NAMES = ["normal", "bacterial", "viral"]
TEMPERATURE = 1.3


def three_classes(n: int, seed: int) -> SimpleNamespace:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    return SimpleNamespace(logits=rng.normal(0, 1, (n, 3)) + 1.5 * np.eye(3)[labels], labels=labels)


def test_assess_of_three_classes_scores_the_class_an_export_without_a_positive_label_serves():
    val, test = three_classes(120, 0), three_classes(90, 1)
    served = positive_index(LABEL_NAMES, None)  # the package's positive_label, whose probability serving reports
    result = assess(val, test, TEMPERATURE, n_resamples=20)
    score = probabilities(test.logits, TEMPERATURE)[:, served]  # Score.probability; priority is score >= threshold
    assert result["test_auc"] == pytest.approx(roc_auc_score(test.labels == served, score))
    flagged = score >= result["youden_threshold"]
    assert result["test_sens_youden"] == pytest.approx(flagged[test.labels == served].mean())
    assert result["test_spec_youden"] == pytest.approx((~flagged)[test.labels != served].mean())
    assert result == assess(val, test, TEMPERATURE, positive=served, n_resamples=20)
