"""A binary prediction tied at p = 0.5 counts as the positive class everywhere accuracy is computed."""

from types import SimpleNamespace

import numpy as np

from medtriage.evaluation.assess import assess
from medtriage.evaluation.metrics import classification_metrics, predicted_classes


def _scored(logits, labels):
    return SimpleNamespace(logits=np.asarray(logits, dtype=np.float64), labels=np.asarray(labels))


def test_test_accuracy_counts_a_tie_as_positive_like_the_training_metrics():
    val = _scored([[2.0, -2.0], [-2.0, 2.0], [1.0, -1.0], [-1.0, 1.0]], [0, 1, 0, 1])
    test = _scored([[0.0, 0.0], [3.0, -3.0]], [1, 0])  # the first image tied at 0.5, truly positive
    assert assess(val, test, temperature=1.0, n_resamples=10)["test_acc"] == 1.0
    assert classification_metrics(test.labels, np.full((2, 2), 0.5))["acc"] == 0.5  # both called positive


def test_a_tie_is_the_named_positive_class_whichever_column_it_is():
    tied = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    assert predicted_classes(tied, positive=1).tolist() == [1, 0, 1]
    assert predicted_classes(tied, positive=0).tolist() == [0, 0, 1]
