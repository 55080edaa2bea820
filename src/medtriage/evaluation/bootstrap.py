"""Uncertainty of reported figures: spread over seeds and bootstrap intervals of a test AUC or of a paired AUC difference."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def bootstrap_auc_ci(
    labels: np.ndarray, scores: np.ndarray, n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of ROC AUC over resamples of the test images (with replacement).

    `scores` may also be `[n_models, n_images]` (several models scoring the same images, e.g. seeds of one
    recipe): each resample then takes the models' mean AUC on the same images, so the interval is that of the
    reported mean, with the test set's sampling noise shared between the models as it is in the figure.
    Resamples holding a single class (AUC undefined) are drawn again rather than skipped, so the
    interval always rests on `n_resamples` values.
    """
    labels, scores = _checked(labels, scores)
    return _interval(labels, lambda pick: _mean_auc(labels, scores, pick), n_resamples, level, seed)


def bootstrap_auc_difference_ci(
    labels: np.ndarray, scores: np.ndarray, baseline: np.ndarray, n_resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Paired percentile interval of mean AUC(`scores`) − mean AUC(`baseline`), both scoring the same images (each
    `[n_images]` or `[n_models, n_images]`): every resample scores both on the same draw, so what the images have in
    common cancels and the interval is that of the difference alone."""
    labels, scores = _checked(labels, scores)
    _, baseline = _checked(labels, baseline)
    return _interval(labels, lambda pick: _mean_auc(labels, scores, pick) - _mean_auc(labels, baseline, pick), n_resamples, level, seed)


def _checked(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels).astype(int), np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if len(np.unique(labels)) < 2:
        raise ValueError("bootstrap AUC needs both classes in the labels")
    if scores.shape[1] != len(labels):
        raise ValueError(f"{scores.shape[1]} scores per model for {len(labels)} labels")
    return labels, scores


def _mean_auc(labels: np.ndarray, scores: np.ndarray, pick: np.ndarray) -> float:
    return float(np.mean([roc_auc_score(labels[pick], model[pick]) for model in scores]))


def _interval(labels: np.ndarray, statistic, n_resamples: int, level: float, seed: int) -> tuple[float, float]:
    """Percentile interval of `statistic(pick)` over resamples `pick` of the images holding both classes."""
    rng = np.random.default_rng(seed)
    values = []
    while len(values) < n_resamples:
        pick = rng.integers(0, len(labels), len(labels))
        if labels[pick].min() != labels[pick].max():
            values.append(statistic(pick))
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)
