"""Labels, splits and scores no evaluation figure can mean anything on are refused with what is wrong and where,
instead of a scikit-learn or numpy error, or a number computed on something else."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from medtriage.errors import InputError
from medtriage.evaluation.assess import assess
from medtriage.evaluation.bootstrap import bootstrap_auc_ci, mean_sd
from medtriage.evaluation.calibration import cross_fitted_log_loss, expected_calibration_error, fit_temperature, stratified_halves
from medtriage.evaluation.metrics import evaluate, softmax
from medtriage.evaluation.operating_points import choose_threshold

RNG = np.random.default_rng(0)
LABELS = np.array([0, 1] * 20)
LOGITS = RNG.normal(0, 1, (40, 2)) + 2.0 * np.eye(2)[LABELS]
SITES = np.array(["a", "b"] * 20)
SCORES = softmax(LOGITS)[:, 1]


def split(logits=LOGITS, labels=LABELS) -> SimpleNamespace:
    return SimpleNamespace(logits=logits, labels=labels)


def assessed(test=None, val=None, **kwargs):
    return lambda: assess(val or split(), test or split(), 1.0, n_resamples=5, **kwargs)


def with_label(value) -> np.ndarray:
    labels = LABELS.astype(object if isinstance(value, str) else np.float64)
    labels[1] = value
    return labels


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (assessed(split(labels=with_label(0.5))), "not class numbers"),  # was truncated to 0 and counted as negative
        (assessed(split(labels=LABELS.astype(str))), "not class numbers"),
        (assessed(split(labels=with_label(2))), "not class numbers"),
        (assessed(split(labels=LABELS[:-1])), "39 labels for 40 test images"),
        (assessed(val=split(labels=LABELS[:-1])), "39 labels for 40 validation images"),
        (assessed(split(labels=np.zeros(40, int))), "test split.*both"),
        (assessed(split(np.zeros((0, 2)), np.zeros(0, int))), "no images.*0 test images"),
        (assessed(split(np.hstack([LOGITS, LOGITS[:, :1]]))), "2 classes, test logits 3 classes"),
        (assessed(positive=2), "positive class 2"),
        (assessed(positive=-1), "positive class -1"),
    ],
    ids=["fraction", "strings", "other-class", "test-length", "val-length", "one-class", "empty", "classes", "positive", "negative"],
)
def test_assess_refuses_splits_it_cannot_assess(call, match):
    with pytest.raises(InputError, match=match):
        call()


@pytest.mark.parametrize(
    ("labels", "sites", "logits", "match"),
    [
        (with_label(0.5), SITES, LOGITS, "not class numbers"),
        (with_label(np.nan), SITES, LOGITS, "not class numbers"),
        (LABELS.astype(str), SITES, LOGITS, "not class numbers"),
        (LABELS * 2, SITES, LOGITS, "not class numbers"),
        (LABELS[:-1], SITES[:-1], LOGITS, "39 labels for 40 images"),
        (LABELS, SITES[:-1], LOGITS, "39 sites for 40 images"),
        (LABELS[:0], SITES[:0], LOGITS[:0], "no images"),
    ],
    ids=["fraction", "nan", "strings", "other-class", "labels-length", "sites-length", "empty"],
)
def test_metrics_refuse_labels_that_are_not_one_class_per_image(labels, sites, logits, match):
    with pytest.raises(InputError, match=match):
        evaluate(logits, labels, sites, "val")


@pytest.mark.parametrize(
    ("labels", "logits", "match"),
    [
        (LABELS.astype(str), LOGITS, "not class numbers"),
        (LABELS * 2, LOGITS, "not class numbers"),
        (LABELS[:-1], LOGITS, "39 labels for 40 images"),
        (LABELS[:0], LOGITS[:0], "no images"),
    ],
    ids=["strings", "other-class", "length", "empty"],
)
def test_a_temperature_is_fitted_on_one_class_number_per_image_only(labels, logits, match):
    with pytest.raises(InputError, match=match):
        fit_temperature(logits, labels)


def test_a_cross_fitted_log_loss_of_fewer_labels_than_images_is_refused_not_computed():
    with pytest.raises(InputError, match="39 labels for 40 images"):  # was a log-loss pairing images with others' labels
        cross_fitted_log_loss(LOGITS, LABELS[:-1])
    with pytest.raises(InputError, match="at least 2 cases of each of 2 classes"):
        stratified_halves(np.array([0, 1, 1, 1]))


@pytest.mark.parametrize("labels", [LABELS * 5, -LABELS], ids=["above", "negative"])
def test_ece_refuses_labels_that_are_no_class_of_the_probabilities(labels):
    with pytest.raises(InputError, match="not class numbers"):  # every such image was counted as wrong
        expected_calibration_error(softmax(LOGITS), labels)


def test_a_threshold_needs_one_score_per_labelled_image():
    with pytest.raises(InputError, match="39 labels for 40 scores"):
        choose_threshold(SCORES, LABELS[:-1], "youden")
    with pytest.raises(InputError, match="one score per image"):
        choose_threshold(softmax(LOGITS), LABELS, "youden")  # the probability matrix, not p(positive)


def test_a_bootstrap_of_one_class_or_unpaired_scores_is_an_input_error():
    with pytest.raises(InputError, match="both classes"):
        bootstrap_auc_ci(np.zeros(40, int), SCORES, 5)
    with pytest.raises(InputError, match="scores per model"):
        bootstrap_auc_ci(LABELS[:-1], SCORES, 5)


def test_mean_sd_of_a_figure_that_is_not_finite_is_refused_not_nan():
    with pytest.raises(InputError, match="not finite"):
        mean_sd([0.91, np.nan, 0.93])
