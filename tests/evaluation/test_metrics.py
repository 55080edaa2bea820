import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medtriage.evaluation.metrics import classification_metrics, evaluate, site_values, softmax


def logits_for(p_positive: np.ndarray) -> np.ndarray:
    return np.log(np.stack([1 - p_positive, p_positive], axis=1))


@pytest.fixture
def scored():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    p = np.clip(labels * 0.3 + rng.random(200) * 0.7, 1e-4, 1 - 1e-4)
    sites = np.array(["a", "b"])[rng.integers(0, 2, 200)]
    return labels, p, sites


def test_overall_and_per_site_auc_match_scikit_learn(scored):
    labels, p, sites = scored
    metrics = evaluate(logits_for(p), labels, sites, "val")
    assert metrics["val/auc"] == pytest.approx(roc_auc_score(labels, p))
    for site in ("a", "b"):
        mask = sites == site
        assert metrics[f"val/site/{site}/auc"] == pytest.approx(roc_auc_score(labels[mask], p[mask]))
    assert site_values(metrics, "val") == {s: metrics[f"val/site/{s}/auc"] for s in ("a", "b")}


def test_sensitivity_and_specificity_at_one_half(scored):
    labels, p, _ = scored
    metrics = classification_metrics(labels, softmax(logits_for(p)))
    predicted = p >= 0.5
    assert metrics["sens"] == pytest.approx(predicted[labels == 1].mean())
    assert metrics["spec"] == pytest.approx((~predicted)[labels == 0].mean())
    assert metrics["acc"] == pytest.approx((predicted == labels).mean())


def test_a_single_class_site_reports_no_auc_instead_of_a_made_up_one():
    labels = np.array([1, 1, 0, 1])
    sites = np.array(["a", "a", "b", "b"])
    metrics = evaluate(logits_for(np.array([0.9, 0.2, 0.3, 0.8])), labels, sites, "test")
    assert "test/site/a/auc" not in metrics and "test/site/a/spec" not in metrics
    assert metrics["test/site/b/auc"] == 1.0 and metrics["test/site/a/sens"] == 0.5


def test_multiclass_auc_is_one_vs_rest_macro():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 20)
    logits = rng.normal(size=(60, 3)) + np.eye(3)[labels]
    metrics = classification_metrics(labels, softmax(logits))
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, softmax(logits), multi_class="ovr"))
    assert "sens" not in metrics
