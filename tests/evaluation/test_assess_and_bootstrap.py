"""Assessment on validation-chosen operating points and the bootstrap interval."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medtriage.evaluation.assess import assess
from medtriage.evaluation.bootstrap import bootstrap_auc_ci, bootstrap_auc_difference_ci, mean_sd


def scores(n: int, shift: float, seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    margin = rng.normal(0, 1, n) + shift * (2 * labels - 1)
    return SimpleNamespace(logits=np.stack([-margin, margin], axis=1) * 1.5, labels=labels)


def test_assess_picks_thresholds_on_validation_and_reports_test():
    val, test = scores(400, 1.2, 0), scores(300, 0.8, 1)  # test is harder than validation, as in PneumoniaMNIST
    result = assess(val, test, temperature=1.5, n_resamples=200)
    test_auc = roc_auc_score(test.labels, test.logits[:, 1])
    assert result["test_auc"] == pytest.approx(test_auc)
    assert result["test_auc_ci_low"] < test_auc < result["test_auc_ci_high"]
    assert result["sens95_threshold"] < result["youden_threshold"]  # a high-sensitivity point sits lower
    assert result["test_sens_sens95"] > result["test_sens_youden"]
    predicted = (test.logits[:, 1] > test.logits[:, 0]).astype(int)
    assert result["test_acc"] == pytest.approx((predicted == test.labels).mean())
    # the same assessment with another test set changes the test figures but not the thresholds
    other = assess(val, scores(300, 0.3, 2), temperature=1.5, n_resamples=200)
    assert other["youden_threshold"] == result["youden_threshold"] and other["test_auc"] < result["test_auc"]


def test_bootstrap_interval_narrows_with_more_images_and_mean_sd():
    small, large = scores(80, 0.8, 3), scores(2000, 0.8, 3)
    low_s, high_s = bootstrap_auc_ci(small.labels, small.logits[:, 1], 300)
    low_l, high_l = bootstrap_auc_ci(large.labels, large.logits[:, 1], 300)
    assert high_l - low_l < high_s - low_s
    assert mean_sd([0.9, 0.92, 0.94]) == pytest.approx((0.92, 0.02))
    assert mean_sd([0.5]) == (0.5, 0.0)


def test_bootstrap_interval_of_several_models_is_that_of_their_mean_auc():
    data = scores(300, 0.8, 4)
    rng = np.random.default_rng(0)
    models = np.stack([data.logits[:, 1] + rng.normal(0, 0.5, len(data.labels)) for _ in range(3)])
    mean_auc = np.mean([roc_auc_score(data.labels, m) for m in models])
    low, high = bootstrap_auc_ci(data.labels, models, 300)
    assert low < mean_auc < high
    # one model alone is the plain interval; a shape mismatch is an error, not a silent broadcast
    assert bootstrap_auc_ci(data.labels, models[0], 300) == bootstrap_auc_ci(data.labels, models[:1], 300)
    with pytest.raises(ValueError, match="scores per model"):
        bootstrap_auc_ci(data.labels, models[:, :-1], 50)


def test_paired_difference_interval_is_narrower_than_the_unpaired_intervals_allow():
    data = scores(300, 0.8, 5)
    rng = np.random.default_rng(1)
    better = data.logits[:, 1] + rng.normal(0, 0.2, len(data.labels))
    worse = data.logits[:, 1] + rng.normal(0, 1.0, len(data.labels))
    difference = roc_auc_score(data.labels, better) - roc_auc_score(data.labels, worse)
    low, high = bootstrap_auc_difference_ci(data.labels, better, worse, 300)
    assert 0 < low < difference < high  # the gain is resolved: both are scored on each resample's same images
    (b_low, b_high), (w_low, w_high) = (bootstrap_auc_ci(data.labels, s, 300) for s in (better, worse))
    assert b_low < w_high  # while their separate intervals overlap
    assert bootstrap_auc_difference_ci(data.labels, better, better, 100) == (0.0, 0.0)
    with pytest.raises(ValueError, match="scores per model"):
        bootstrap_auc_difference_ci(data.labels, better, worse[:-1], 50)


def test_validation_log_loss_rewards_confident_correct_scores():
    val, test = scores(400, 1.2, 0), scores(300, 0.8, 1)
    sharper = SimpleNamespace(logits=val.logits * 3, labels=val.labels)
    plain, sharp = assess(val, test, 1.0, n_resamples=50), assess(sharper, test, 1.0, n_resamples=50)
    assert plain["val_auc"] == pytest.approx(sharp["val_auc"])  # same ranking, so AUC cannot tell them apart
    assert plain["val_log_loss"] != pytest.approx(sharp["val_log_loss"])
