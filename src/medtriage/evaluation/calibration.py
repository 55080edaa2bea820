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


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 minimising validation NLL of softmax(logits / T) (Guo et al. 2017)."""
    logits, labels = _scored(logits, labels)
    classes = np.arange(logits.shape[1])

    def nll(log_t: float) -> float:
        return log_loss(labels, probabilities(logits, float(np.exp(log_t))), labels=classes)

    low, high = np.log(TEMPERATURE_BOUNDS)  # searching log T keeps T positive
    result = minimize_scalar(nll, bounds=(low, high), method="bounded")
    for bound, why in ((low, "perfectly separated: their log-loss keeps falling as T shrinks"), (high, "near chance")):
        if nll(bound) <= result.fun:  # the log-loss still falls towards the bound: the fit found no minimum, say so
            log.warning(
                "temperature fit found no minimum before its bound T=%.3g (kept T=%.3g): the validation cases are %s",
                np.exp(bound),
                np.exp(result.x),
                why,
            )
    return float(np.exp(result.x))


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
    """(mean confidence, accuracy, image count) of each non-empty bin of top-label confidence: `n_bins` equal-width
    bins [k/n, (k+1)/n), the last one closed so that a confidence of 1.0 counts."""
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
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    used, counts = np.unique(bins, return_counts=True)
    return (
        np.array([confidence[bins == b].mean() for b in used]),
        np.array([correct[bins == b].mean() for b in used]),
        counts,
    )
