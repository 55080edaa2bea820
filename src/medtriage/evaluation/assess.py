"""Test-set assessment of a calibrated model, every choice made on validation only.

Temperature (fitted on validation by the export), operating points chosen on validation
(sensitivity >= 0.95, Youden), then on test: AUC with a 95% bootstrap interval, accuracy (binary: the
positive class at p >= 0.5, as predicted_classes), sensitivity/specificity at each operating point, ECE (15 bins)
before and after scaling.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, log_loss, recall_score, roc_auc_score

from medtriage.evaluation.bootstrap import bootstrap_auc_ci
from medtriage.evaluation.calibration import expected_calibration_error, probabilities
from medtriage.evaluation.metrics import predicted_classes
from medtriage.evaluation.operating_points import choose_threshold

OPERATING_POINTS = {"sens95": ("sensitivity", 0.95), "youden": ("youden", None)}


def assess(val, test, temperature: float, positive: int = 1, n_bins: int = 15, n_resamples: int = 1000) -> dict[str, float]:
    """`val`/`test`: objects with `.logits` and `.labels` (medtriage.evaluation.predictions.Predictions)."""
    val_labels, test_labels = np.asarray(val.labels).astype(int), np.asarray(test.labels).astype(int)
    val_scores = probabilities(val.logits, temperature)[:, positive]
    test_probs = probabilities(test.logits, temperature)
    test_scores, test_positive = test_probs[:, positive], test_labels == positive
    low, high = bootstrap_auc_ci(test_positive, test_scores, n_resamples)
    result = {
        "temperature": float(temperature),
        "val_auc": float(roc_auc_score(val_labels == positive, val_scores)),
        # a proper scoring rule keeps separating models after validation AUC saturates near 1
        "val_log_loss": float(
            log_loss(val_labels, probabilities(val.logits, temperature), labels=np.arange(np.asarray(val.logits).shape[1]))
        ),
        "test_auc": float(roc_auc_score(test_positive, test_scores)),
        "test_auc_ci_low": low,
        "test_auc_ci_high": high,
        "test_acc": float(accuracy_score(test_labels, predicted_classes(test_probs, positive))),
        "test_ece_before": expected_calibration_error(probabilities(test.logits), test_labels, n_bins),
        "test_ece_after": expected_calibration_error(test_probs, test_labels, n_bins),
        "val_ece_before": expected_calibration_error(probabilities(val.logits), val_labels, n_bins),
        "val_ece_after": expected_calibration_error(probabilities(val.logits, temperature), val_labels, n_bins),
    }
    for key, (rule, target) in OPERATING_POINTS.items():
        point = choose_threshold(val_scores, val_labels == positive, rule, target)
        predicted = test_scores >= point.threshold
        result[f"{key}_threshold"] = point.threshold
        result[f"test_sens_{key}"] = float(recall_score(test_positive, predicted, pos_label=True, zero_division=0))
        result[f"test_spec_{key}"] = float(recall_score(test_positive, predicted, pos_label=False, zero_division=0))
        result[f"test_acc_{key}"] = float(accuracy_score(test_positive, predicted))
    return result
