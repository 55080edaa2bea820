"""Operating points: thresholds on the positive-class probability, chosen on validation only."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import roc_curve

from medtriage.errors import ConfigError, InputError
from medtriage.evaluation.metrics import EvaluationInputError, binary_labels, finite, unit_interval

# Rules that turn validation scores into a threshold (see choose_threshold).
THRESHOLD_RULES = ("sensitivity", "specificity", "youden")
# The export settings a review or an urgent point is chosen by: (rule, target).
REVIEW_SETTINGS = ("export.threshold_rule", "export.threshold_target")
URGENT_SETTINGS = ("export.urgent_rule", "export.urgent_target")
OOD_SCORES_HINT = (
    "an image far outside the training images' range (its features overflow) or a diverged model scores so: find it among the images scored"
)


@dataclass(frozen=True)
class OperatingPoint:
    rule: str
    target: float | None
    threshold: float
    sensitivity: float  # on validation, predicting positive when score >= threshold
    specificity: float

    def as_dict(self) -> dict:
        return asdict(self)


def flagging_threshold(scores: np.ndarray, rate: float, where: str | None = None, hint: str = OOD_SCORES_HINT) -> float:
    """The OOD threshold's rule: the score above which a share `rate` of in-distribution (validation) images lies.
    Each refusal names `where`, the caller's setting or field the threshold is set for; `hint` says what to do about
    scores that are not finite."""
    if not 0.0 <= rate <= 1.0:  # numpy would refuse it as a quantile, naming neither the rate nor its setting
        raise InputError(
            f"OOD false-alarm rate {rate} is not a fraction in [0, 1]", where=where, hint="e.g. 0.01 flags 1% of validation images"
        )
    scores = finite(scores, "OOD validation scores", where, hint)  # one NaN would make the threshold NaN: nothing ever flagged
    if scores.size == 0:
        raise InputError("no validation scores to set the OOD threshold on", where=where, hint="score the validation images first")
    return float(np.quantile(scores, 1.0 - rate))


def check_rule(rule: str, where: str = "export.threshold_rule") -> None:
    """Refuse a rule that is not one of THRESHOLD_RULES; `where` is the setting that named it."""
    if rule not in THRESHOLD_RULES:
        raise ConfigError(f"unknown threshold rule '{rule}'", where=where, hint=f"use one of {', '.join(THRESHOLD_RULES)}")


def choose_threshold(
    scores: np.ndarray, labels: np.ndarray, rule: str, target: float | None = None, settings: tuple[str, str] = REVIEW_SETTINGS
) -> OperatingPoint:
    """Pick a threshold on `scores` (positive-class probability) against binary `labels` by `rule`. `settings`: the
    (rule, target) settings that named them, which a refusal of either names."""
    check_rule(rule, settings[0])
    scores = unit_interval(scores, "validation scores")  # a threshold on logits would not apply to the served probabilities
    labels = binary_labels(labels, "validation labels")
    if scores.ndim != 1 or len(labels) != len(scores):  # scikit-learn would refuse them without saying which is which
        raise EvaluationInputError(
            f"{len(labels)} labels for {len(scores)} scores of shape {list(scores.shape)}",
            hint="pass one score per image, p(positive) (a column of the probabilities), and one label per score",
        )
    if len(np.unique(labels)) < 2:
        raise InputError("validation split holds a single class; no threshold can be chosen", hint="check the split of the pool")
    # Served probabilities and thresholds are float32 (serve.package.served_threshold): chosen among the scores as
    # served, the threshold flags exactly the validation cases its sensitivity and specificity count, where float64
    # scores that float32 cannot tell apart would fall on either side of it.
    served = scores.astype(np.float32)
    fpr, tpr, thresholds = roc_curve(labels, served, drop_intermediate=False)
    # sklearn's first point flags nothing (threshold inf). Only a specificity target may need it - when negatives hold
    # the top score - and then as the least threshold above every score, so that the target is kept, not missed.
    thresholds[0] = np.nextafter(np.float32(thresholds[1]), np.float32(np.inf))  # a float32 step: served scores stay below
    first = 0 if rule == "specificity" else 1
    index = first + _pick(rule, target, tpr[first:], 1.0 - fpr[first:], settings[1])
    if thresholds[index] > 1.0:
        raise InputError(
            f"no threshold in [0, 1] keeps specificity >= {target}: validation negatives score 1.0",
            where=settings[1],
            hint="lower the specificity target, or calibrate so that scores do not saturate",
        )
    threshold = _least_served_as(scores, served, thresholds[index])
    return OperatingPoint(rule, None if rule == "youden" else target, threshold, float(tpr[index]), float(1.0 - fpr[index]))


def flagged(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Whether each probability is at or above `threshold` as served: both float32 (serve.package.served_threshold), so
    that scores float32 cannot tell from the threshold are flagged, as serving flags them."""
    return np.asarray(scores).astype(np.float32) >= np.float32(threshold)


def _least_served_as(scores: np.ndarray, served: np.ndarray, threshold: float) -> float:
    """The least validation score served as `threshold` (itself where none is: the step above every score), so that
    float64 scores compared with it fall on the side their served float32 ones do, and it is served as `threshold`."""
    tied = scores[served == threshold]
    return float(tied.min()) if tied.size else float(threshold)


def _pick(rule: str, target: float | None, sensitivity: np.ndarray, specificity: np.ndarray, setting: str) -> int:
    # Thresholds fall along the arrays: sensitivity rises, specificity falls.
    if rule == "youden":
        return int(np.argmax(sensitivity + specificity - 1.0))
    if target is None or not 0.0 < target <= 1.0:
        raise ConfigError(
            f"rule '{rule}' needs a target in (0, 1], got {target}", where=setting, hint=f"the {rule} to keep, e.g. {setting}=0.95"
        )
    if rule == "sensitivity":
        return int(np.flatnonzero(sensitivity >= target)[0])  # highest threshold that reaches it
    return int(np.flatnonzero(specificity >= target)[-1])  # lowest threshold that keeps it


def priority_thresholds(review: OperatingPoint, urgent: OperatingPoint | None) -> dict:
    """The thresholds block of model.json; an urgent threshold never sits below the review one."""
    block = {"review": review.as_dict(), "urgent": None}
    if urgent is not None:
        block["urgent"] = urgent.as_dict()
        if urgent.threshold < review.threshold:
            block["urgent"].update(
                threshold=review.threshold,
                sensitivity=review.sensitivity,
                specificity=review.specificity,
                note="the urgent rule fell below the review threshold; clamped to it",
            )
    return block


def choose_priority_thresholds(
    scores: np.ndarray,
    is_positive: np.ndarray,
    review_rule: str,
    review_target: float | None,
    urgent_rule: str | None = None,
    urgent_target: float | None = None,
) -> dict:
    """The thresholds block for `scores` (tiles or slides alike): a review point and an optional urgent one."""
    review = choose_threshold(scores, is_positive, review_rule, review_target, REVIEW_SETTINGS)
    urgent = choose_threshold(scores, is_positive, urgent_rule, urgent_target, URGENT_SETTINGS) if urgent_rule else None
    return priority_thresholds(review, urgent)
