"""Test-set assessment of a calibrated model, every choice made on validation only.

Temperature (fitted on validation by the export), operating points chosen on validation
(sensitivity >= 0.95, Youden), then on test: AUC with a 95% bootstrap interval, accuracy (binary: the
positive class at p >= 0.5, as predicted_classes; more classes: the likeliest one, the published rule),
sensitivity/specificity/accuracy of positive against the rest at each operating point, ECE (15 bins, top-label)
before and after scaling. AUC and operating points are those of the score a package serves whatever the number of
classes: p(positive class), flagged for review at or above the threshold (serve.predictor's priority).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, log_loss, recall_score, roc_auc_score

from medtriage.evaluation.bootstrap import bootstrap_auc_ci
from medtriage.evaluation.calibration import expected_calibration_error, probabilities
from medtriage.evaluation.metrics import EvaluationInputError, class_labels, class_matrix, predicted_classes, require_images
from medtriage.evaluation.operating_points import choose_threshold, flagged

OPERATING_POINTS = {"sens95": ("sensitivity", 0.95), "youden": ("youden", None)}


def assess(val, test, temperature: float, positive: int | None = None, n_bins: int = 15, n_resamples: int = 1000) -> dict[str, float]:
    """`val`/`test`: objects with `.logits` and `.labels` (medtriage.evaluation.predictions.Predictions). `positive`:
    the index of the package's positive label; None is the last class, the one an export without
    export.positive_label serves."""
    (val_logits, val_labels), (test_logits, test_labels) = _split(val, "validation"), _split(test, "test")
    positive = _positive_class(positive, val_logits.shape[1], test_logits.shape[1])
    for labels, name in ((val_labels, "validation"), (test_labels, "test")):
        _require_both(labels == positive, name, positive)
    val_scores = probabilities(val_logits, temperature)[:, positive]
    test_probs = probabilities(test_logits, temperature)
    test_scores, test_positive = test_probs[:, positive], test_labels == positive
    low, high = bootstrap_auc_ci(test_positive, test_scores, n_resamples)
    result = {
        "temperature": float(temperature),
        "val_auc": float(roc_auc_score(val_labels == positive, val_scores)),
        # a proper scoring rule keeps separating models after validation AUC saturates near 1
        "val_log_loss": float(log_loss(val_labels, probabilities(val_logits, temperature), labels=np.arange(val_logits.shape[1]))),
        "test_auc": float(roc_auc_score(test_positive, test_scores)),
        "test_auc_ci_low": low,
        "test_auc_ci_high": high,
        "test_acc": float(accuracy_score(test_labels, predicted_classes(test_probs, positive))),
        "test_ece_before": expected_calibration_error(probabilities(test_logits), test_labels, n_bins),
        "test_ece_after": expected_calibration_error(test_probs, test_labels, n_bins),
        "val_ece_before": expected_calibration_error(probabilities(val_logits), val_labels, n_bins),
        "val_ece_after": expected_calibration_error(probabilities(val_logits, temperature), val_labels, n_bins),
    }
    for key, (rule, target) in OPERATING_POINTS.items():
        point = choose_threshold(val_scores, val_labels == positive, rule, target)
        predicted = flagged(test_scores, point.threshold)
        result[f"{key}_threshold"] = point.threshold
        result[f"test_sens_{key}"] = float(recall_score(test_positive, predicted, pos_label=True, zero_division=0))
        result[f"test_spec_{key}"] = float(recall_score(test_positive, predicted, pos_label=False, zero_division=0))
        result[f"test_acc_{key}"] = float(accuracy_score(test_positive, predicted))
    return result


def _split(split, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's logits `[images, classes]` and one class number per image."""
    logits = class_matrix(split.logits, f"{name} logits")
    labels = class_labels(split.labels, logits.shape[1], f"{name} labels")
    require_images(labels, len(logits), f"{name} images")
    return logits, labels


def _positive_class(positive: int | None, val_classes: int, test_classes: int) -> int:
    if val_classes != test_classes:
        raise EvaluationInputError(
            f"validation logits have {val_classes} classes, test logits {test_classes} classes",
            hint="score both splits with the same model",
        )
    if positive is None:
        return val_classes - 1
    if not (isinstance(positive, (int, np.integer)) and 0 <= positive < val_classes):  # -1 would match no label
        raise EvaluationInputError(f"positive class {positive!r} is not a class of a {val_classes}-class model", hint="pass its index")
    return int(positive)


def _require_both(is_positive: np.ndarray, name: str, positive: int) -> None:
    """AUC and operating points need images of the positive class and of the others in each split."""
    found = int(is_positive.sum())
    if 0 < found < len(is_positive):
        return
    raise EvaluationInputError(
        f"{found} images of the positive class {positive} and {len(is_positive) - found} others: AUC and operating points need both",
        where=f"{name} split",
        hint="assess on a split that holds positive and negative images; check how the pool was split",
    )
