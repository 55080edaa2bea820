"""Uncertainty of reported figures: spread over seeds and bootstrap intervals of a test AUC or of a paired AUC difference."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from medtriage.errors import InputError
from medtriage.evaluation.metrics import EvaluationInputError, binary_labels, finite


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = finite(values, "figures to average")  # one NaN (an undefined AUC) would make both NaN
    if values.size == 0:  # numpy would answer NaN with a warning
        raise InputError("no values to take the mean and standard deviation of", hint="pass one figure per seed")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def bootstrap_auc_ci(
    labels: np.ndarray,
    scores: np.ndarray,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile interval of ROC AUC over resamples of the test images (with replacement).

    `scores` may also be `[n_models, n_images]` (several models scoring the same images, e.g. seeds of one
    recipe): each resample then takes the models' mean AUC on the same images, so the interval is that of the
    reported mean, with the test set's sampling noise shared between the models as it is in the figure.
    `groups` (one patient ID per image) resamples whole patients instead: images of one patient are not
    independent cases, and resampling them one by one would narrow the interval as if they were.
    Resamples holding a single class (AUC undefined) are drawn again rather than skipped, so the
    interval always rests on `n_resamples` values.
    """
    labels, scores = _checked(labels, scores)
    return _interval(labels, lambda pick: _mean_auc(labels, scores, pick), n_resamples, level, seed, groups)


def bootstrap_auc_difference_ci(
    labels: np.ndarray,
    scores: np.ndarray,
    baseline: np.ndarray,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """Paired percentile interval of mean AUC(`scores`) − mean AUC(`baseline`), both scoring the same images (each
    `[n_images]` or `[n_models, n_images]`): every resample scores both on the same draw, so what the images have in
    common cancels and the interval is that of the difference alone. `groups` as in `bootstrap_auc_ci`."""
    labels, scores = _checked(labels, scores)
    _, baseline = _checked(labels, baseline, "baseline scores")

    def gain(pick: np.ndarray) -> float:
        return _mean_auc(labels, scores, pick) - _mean_auc(labels, baseline, pick)

    return _interval(labels, gain, n_resamples, level, seed, groups)


def _checked(labels: np.ndarray, scores: np.ndarray, what: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    labels, scores = binary_labels(labels, "bootstrap labels"), np.atleast_2d(finite(scores, what))
    if len(np.unique(labels)) < 2:
        raise EvaluationInputError(
            f"bootstrap AUC needs both classes in the labels; the {len(labels)} labels hold {np.unique(labels).tolist()}",
            hint="an AUC is undefined on images of one class: score a split with positive and negative images",
        )
    if scores.shape[1] != len(labels):
        raise EvaluationInputError(f"{scores.shape[1]} scores per model for {len(labels)} labels", hint="pass one score per labelled image")
    return labels, scores


def _mean_auc(labels: np.ndarray, scores: np.ndarray, pick: np.ndarray) -> float:
    return float(np.mean([roc_auc_score(labels[pick], model[pick]) for model in scores]))


def _sampler(groups: np.ndarray | None, n_images: int):
    """A function drawing one resample's image indices with `rng`: `n_groups` groups with replacement, each with all
    its images (groups in order of first appearance, so that one image per group draws as `groups=None` does)."""
    if groups is None:
        return lambda rng: rng.integers(0, n_images, n_images)
    groups = np.asarray(groups)
    if len(groups) != n_images:
        raise InputError(f"{len(groups)} groups for {n_images} images", hint="pass one patient ID per image")
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    by_group = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
    members = [by_group[g] for g in np.argsort(first, kind="stable")]
    return lambda rng: np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])


def _interval(labels: np.ndarray, statistic, n_resamples: int, level: float, seed: int, groups: np.ndarray | None) -> tuple[float, float]:
    """Percentile interval of `statistic(pick)` over resamples `pick` holding both classes."""
    if not (isinstance(n_resamples, (int, np.integer)) and n_resamples >= 1):
        raise InputError(f"{n_resamples!r} bootstrap resamples", hint="use 1 or more (1000 by default)")
    if not 0.0 < level < 1.0:
        raise InputError(f"interval level {level} is not a fraction in (0, 1)", hint="e.g. 0.95 for a 95% interval")
    draw = _sampler(groups, len(labels))
    rng = np.random.default_rng(seed)
    values = []
    while len(values) < n_resamples:
        pick = draw(rng)
        if labels[pick].min() != labels[pick].max():
            values.append(statistic(pick))
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)
