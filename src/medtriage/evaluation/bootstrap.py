"""Uncertainty of reported figures: spread over seeds and a bootstrap interval of the test AUC."""

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
    labels, scores = np.asarray(labels).astype(int), np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if len(np.unique(labels)) < 2:
        raise ValueError("bootstrap AUC needs both classes in the labels")
    if scores.shape[1] != len(labels):
        raise ValueError(f"{scores.shape[1]} scores per model for {len(labels)} labels")
    rng = np.random.default_rng(seed)
    values = []
    while len(values) < n_resamples:
        pick = rng.integers(0, len(labels), len(labels))
        if labels[pick].min() != labels[pick].max():
            values.append(np.mean([roc_auc_score(labels[pick], model[pick]) for model in scores]))
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)
