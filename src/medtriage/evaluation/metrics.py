"""Classification metrics from scikit-learn: AUC, accuracy, sensitivity and specificity, per site.

Binary tasks use p(class 1) (the finding) and a 0.5 threshold; multi-class AUC is one-vs-rest
macro. Log-loss and Brier score are proper scores: they still rank models when AUC saturates near 1. A metric undefined on a subset (one class only) is left out rather than reported as 0.5.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss, recall_score, roc_auc_score, roc_curve

from medtriage.errors import InputError

THRESHOLD = 0.5
PROBABILITY_SLACK = 1e-6  # float32 softmax outputs may overshoot 1 by a rounding step
LABELS_HINT = "pass one class index (0 to the number of classes - 1) per scored image"
NON_FINITE_HINT = "a diverged model or a broken input produced them; find and fix that before evaluating"


class EvaluationInputError(InputError, ValueError):
    """Inputs no evaluation figure can be computed on. Also a ValueError, the type callers catching a bad argument to
    these functions expect."""


def finite(values: np.ndarray, what: str, where: str | None = None, hint: str = NON_FINITE_HINT) -> np.ndarray:
    """`values` as float64, refused if any is NaN or infinite: no statistic over them would mean anything. `where`
    and `hint` are the caller's: the setting, file or field the values are for, and what to do there."""
    values = np.asarray(values, dtype=np.float64)
    bad = np.argwhere(~np.isfinite(values))
    if len(bad):
        raise InputError(
            f"{what}: {len(bad)} value(s) not finite (first at index {', '.join(map(str, bad[0]))}: {values[tuple(bad[0])]})",
            where=where,
            hint=hint,
        )
    return values


def class_matrix(values: np.ndarray, what: str) -> np.ndarray:
    """`values` as a finite float64 `[images, classes]` array of 2 or more classes: a vector of p(positive) or one
    column would otherwise fail deep in numpy, or give every image a probability of 1."""
    values = finite(values, what)
    if values.ndim != 2 or values.shape[1] < 2:
        raise InputError(
            f"{what} of shape {values.shape} are not [images, classes] with 2 or more classes",
            hint="pass the model's full output, one row per image and one column per class",
        )
    return values


def unit_interval(values: np.ndarray, what: str) -> np.ndarray:
    """`values` (finite), refused if any lies outside [0, 1]: logits or scores passed where probabilities belong."""
    values = finite(values, what)
    outside = np.flatnonzero((values.ravel() < -PROBABILITY_SLACK) | (values.ravel() > 1.0 + PROBABILITY_SLACK))
    if len(outside):
        raise InputError(
            f"{what}: {len(outside)} value(s) outside [0, 1] (first: {values.ravel()[outside[0]]}); they are not probabilities",
            hint="pass softmax probabilities (medtriage.evaluation.calibration.probabilities), not logits",
        )
    return values


def binary_labels(labels: np.ndarray, what: str = "labels") -> np.ndarray:
    """`labels` as int 0/1 (bool, integer or integer-valued float): a third class or a fraction has no place in a
    binary statistic, and `astype(int)` would silently truncate 0.7 to 0."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "biuf" or not np.isin(labels, (0, 1)).all():
        raise InputError(
            f"{what} are not binary: values {np.unique(labels)[:5].tolist()}",
            hint="pass whether each image is positive (0/1 or False/True)",
        )
    return labels.astype(int)


def class_labels(labels: np.ndarray, n_classes: int, what: str = "labels") -> np.ndarray:
    """`labels` as int64 class indices in [0, n_classes) (bool, integer or integer-valued float): a string, a fraction
    or NaN never equals a predicted class and a number outside the classes is a class the model does not have, so each
    would count as wrong, or fail deep in scikit-learn; `astype(int)` would truncate 0.7 to class 0."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "biuf" or not _whole_numbers_below(labels, n_classes):
        shown = list(dict.fromkeys(labels.ravel().tolist()))[:5]  # in order of appearance: mixed types do not sort
        raise EvaluationInputError(
            f"{what} are not class numbers of a {n_classes}-class model: shape {list(labels.shape)}, values {shown}",
            hint=LABELS_HINT,
        )
    return labels.astype(np.int64)


def _whole_numbers_below(values: np.ndarray, limit: int) -> bool:
    with np.errstate(invalid="ignore"):  # NaN compares False: refused
        return bool(np.all((values >= 0) & (values < limit) & (values == np.round(values))))


def require_images(labels: np.ndarray, images: int, what: str = "images") -> None:
    """Refuse labels that are not one per image (pairing an image with another's label), or no images at all."""
    if len(labels) != images:
        raise EvaluationInputError(f"{len(labels)} labels for {images} {what}", hint=LABELS_HINT)
    if images == 0:
        raise EvaluationInputError(f"no images to evaluate: 0 {what}", hint="score at least one image of the split")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of `[N, K]` logits (the one used by metrics, calibration and predictions)."""
    # In float64: float32 rounds every p > 1 - 6e-8 (logit margin > ~17) to 1.0, tying confident cases in AUC/ROC.
    logits = class_matrix(logits, "logits")
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """ROC AUC, or None when `labels` hold a single class (AUC undefined). Probabilities that are not finite, or
    labels that are not one class of theirs per row, are refused: scikit-learn would rank a NaN as a score, or fail
    naming neither."""
    probs = class_matrix(probs, "probabilities")
    labels = class_labels(labels, probs.shape[1])
    require_images(labels, len(probs))
    present = np.unique(labels)
    if len(present) < 2:
        return None
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    if len(present) < probs.shape[1]:
        return None
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def predicted_classes(probs: np.ndarray, positive: int = 1) -> np.ndarray:
    """The predicted class of each row. Binary: `positive` at or above THRESHOLD, as served (a tie at 0.5 is
    positive, where argmax would take class 0); otherwise the likeliest class."""
    if probs.shape[1] == 2:
        return np.where(probs[:, positive] >= THRESHOLD, positive, 1 - positive).astype(np.int64)
    return probs.argmax(axis=1)


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """auc, acc, log-loss (and Brier score) of the uncalibrated probabilities, and for binary tasks sens/spec at the 0.5 threshold (each only when defined)."""
    probs = unit_interval(class_matrix(probs, "probabilities"), "probabilities")
    labels = class_labels(labels, probs.shape[1])
    require_images(labels, len(probs))
    predicted = predicted_classes(probs)
    metrics = {"acc": float(accuracy_score(labels, predicted)), "n": float(len(labels))}
    metrics["log_loss"] = float(log_loss(labels, probs, labels=np.arange(probs.shape[1])))
    if probs.shape[1] == 2:
        metrics["brier"] = float(brier_score_loss(labels, probs[:, 1], pos_label=1))
    value = auc(labels, probs)
    if value is not None:
        metrics["auc"] = value
    if probs.shape[1] == 2:
        if (labels == 1).any():
            metrics["sens"] = float(recall_score(labels, predicted, pos_label=1, zero_division=0))
        if (labels == 0).any():
            metrics["spec"] = float(recall_score(labels, predicted, pos_label=0, zero_division=0))
    return metrics


def evaluate(logits: np.ndarray, labels: np.ndarray, sites: np.ndarray, prefix: str) -> dict[str, float]:
    """Overall and per-site metrics as flat MLflow keys: `val/auc`, `val/site/<site>/auc`, ..."""
    probs, sites = softmax(logits), np.asarray(sites)
    labels = class_labels(labels, probs.shape[1])
    require_images(labels, len(probs))
    if len(sites) != len(probs):  # a boolean mask of another length fails in numpy, naming neither
        raise EvaluationInputError(f"{len(sites)} sites for {len(probs)} images", hint="pass one site per scored image")
    metrics = {f"{prefix}/{k}": v for k, v in classification_metrics(labels, probs).items()}
    for site in sorted(set(sites)):
        mask = sites == site
        site_metrics = classification_metrics(labels[mask], probs[mask])
        metrics.update({f"{prefix}/site/{site}/{k}": v for k, v in site_metrics.items()})
    return metrics


def roc_points(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(false positive rate, true positive rate) of the finding class, for plots; None if undefined."""
    probs = class_matrix(probs, "probabilities")  # a NaN would be drawn as a point of the curve
    labels = class_labels(labels, probs.shape[1])
    require_images(labels, len(probs))
    if probs.shape[1] != 2 or len(np.unique(labels)) < 2:
        return None
    fpr, tpr, _ = roc_curve(labels, probs[:, 1])
    return fpr, tpr


def site_values(metrics: dict[str, float], prefix: str, name: str = "auc") -> dict[str, float]:
    """{site: value} picked out of `evaluate`'s flat keys."""
    head, tail = f"{prefix}/site/", f"/{name}"
    return {k[len(head) : -len(tail)]: v for k, v in metrics.items() if k.startswith(head) and k.endswith(tail)}
