"""Temperature scaling fitted on validation logits, the log-loss it leaves on unseen cases, and the expected calibration
error."""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.metrics import log_loss

from medtriage.errors import InputError
from medtriage.evaluation.metrics import EvaluationInputError, class_labels, class_matrix, require_images, softmax, unit_interval

log = logging.getLogger(__name__)
TEMPERATURE_BOUNDS = (0.05, 20.0)  # [1/20, 20] covers under- and over-confident nets


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature), for a finite temperature > 0 (any other would reverse or erase the ranking)."""
    if not (np.isfinite(temperature) and temperature > 0):
        raise InputError(f"temperature {temperature} is not a finite number above 0", hint="refit it on validation logits")
    return softmax(np.asarray(logits, dtype=np.float64) / temperature)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, where: str = "validation split") -> float:
    """The temperature T > 0 minimising validation NLL of softmax(logits / T) (Guo et al. 2017). `where` names the
    cases in the error refusing labels of a single class."""
    logits, labels = _scored(logits, labels)
    _require_two_classes(labels, where)
    classes = np.arange(logits.shape[1])

    def nll(log_t: float) -> float:
        return log_loss(labels, probabilities(logits, float(np.exp(log_t))), labels=classes)

    low, high = np.log(TEMPERATURE_BOUNDS)  # searching log T keeps T positive
    result = minimize_scalar(nll, bounds=(low, high), method="bounded")
    for bound, why in (
        (low, "perfectly separated, or scored far less confidently than they are ranked: their log-loss keeps falling as T shrinks"),
        (high, "near chance"),
    ):
        if nll(bound) <= result.fun:  # the log-loss still falls towards the bound: the fit found no minimum, say so
            log.warning(
                "temperature fit found no minimum before its bound T=%.3g (kept T=%.3g): the validation cases are %s",
                np.exp(bound),
                np.exp(result.x),
                why,
            )
    return float(np.exp(result.x))


def _require_two_classes(labels: np.ndarray, where: str) -> None:
    """Refuse labels of one class: with no image of another class the log-loss rewards confidence in that class alone,
    so the fit ends at a bound or wherever these logits put it, saying nothing of how sure the model should be."""
    present = np.unique(labels)
    if len(present) < 2:
        raise EvaluationInputError(
            f"all {len(labels)} images are of class {present[0]}: a temperature cannot be fitted on a single class",
            where=where,
            hint="fit it on images of two classes or more; check how the pool was split",
        )


def cross_fitted_log_loss(logits: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """Log-loss after temperature scaling, with no case scored by a temperature fitted on it: the cases are cut into two
    stratified halves and each half is scored with the temperature fitted on the other. A served model is scaled by a
    temperature fitted on validation, so this is the log-loss it can be expected to serve; fitting and scoring on the
    same cases would flatter it."""
    logits, labels = _scored(logits, labels)
    classes = np.arange(logits.shape[1])
    halves = stratified_halves(labels, seed)
    total = 0.0
    for fit, scored in (halves, halves[::-1]):
        temperature = fit_temperature(logits[fit], labels[fit])
        total += log_loss(labels[scored], probabilities(logits[scored], temperature), labels=classes, normalize=False)
    return total / len(labels)


def _scored(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits `[images, classes]` and one class number per image (a log-loss would otherwise pair images with other
    images' labels, or fail in scikit-learn)."""
    logits = class_matrix(logits, "logits")
    labels = class_labels(labels, logits.shape[1])
    require_images(labels, len(logits))
    return logits, labels


def cross_fittable(labels: np.ndarray) -> bool:
    """Whether `stratified_halves` can cut these labels: at least 2 classes, each with at least 2 cases."""
    return _fittable(_class_counts(labels))


def _class_counts(labels: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    return dict(zip(values.tolist(), counts.tolist(), strict=True))


def _fittable(counts: dict[int, int]) -> bool:
    return len(counts) >= 2 and min(counts.values()) >= 2


def stratified_halves(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint index sets that each hold half of every class's cases (shuffled with `seed`)."""
    labels = np.asarray(labels)
    counts = _class_counts(labels)
    if not _fittable(counts):
        raise EvaluationInputError(
            f"cross-fitting a temperature needs at least 2 cases of each of 2 classes; got class counts {counts}",
            hint="check with cross_fittable first, or score a split with more images of each class",
        )
    rng = np.random.default_rng(seed)
    first, second = [], []
    for c in counts:
        members = rng.permutation(np.flatnonzero(labels == c))
        first.append(members[: len(members) // 2])
        second.append(members[len(members) // 2 :])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: the image-weighted gap between confidence and accuracy over `confidence_bins`."""
    confidence, accuracy, counts = confidence_bins(probs, labels, n_bins)
    return float(np.sum(counts * np.abs(accuracy - confidence)) / counts.sum())


def confidence_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean confidence, accuracy, image count) of each non-empty bin of top-label confidence (`confidence_bin_index`):
    the one binning of the expected calibration error and of the reliability diagram."""
    probs = unit_interval(class_matrix(probs, "probabilities"), "probabilities")
    labels = class_labels(labels, probs.shape[1])  # a string, a fraction or another class never equals an argmax
    if not (isinstance(n_bins, (int, np.integer)) and n_bins >= 1):  # 0 would quietly bin everything together
        raise InputError(f"{n_bins!r} confidence bins", hint="use 1 or more bins (15 by default)")
    if len(probs) == 0:
        raise InputError("no probabilities to bin", hint="score at least one image")
    if len(labels) != len(probs):
        raise InputError(f"{len(labels)} labels for {len(probs)} rows of probabilities", hint="pass one label per scored image")
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    bins = confidence_bin_index(confidence, n_bins)
    used, counts = np.unique(bins, return_counts=True)
    return (
        np.array([confidence[bins == b].mean() for b in used]),
        np.array([correct[bins == b].mean() for b in used]),
        counts,
    )


def confidence_bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """The bin of each confidence among `n_bins` equal-width bins [k/n, (k+1)/n), the last one closed [(n-1)/n, 1] so
    that a confidence of 1.0 counts. A confidence at an edge k/n falls in bin k: `confidence * n` may round to just
    below k (29/50 * 50 < 29), so the floor is moved by one where it disagrees with the edges themselves."""
    confidence = np.asarray(confidence, dtype=np.float64)
    bins = np.floor(confidence * n_bins).astype(np.int64)
    bins += (bins + 1) / n_bins <= confidence  # rounded below the edge it sits on
    bins -= bins / n_bins > confidence  # rounded above the next edge
    return np.clip(bins, 0, n_bins - 1)
