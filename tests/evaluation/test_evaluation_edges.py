import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from medtriage.evaluation.metrics import evaluate, roc_points


@pytest.fixture
def confident_float32():
    """float32 logits (as the network returns them) whose margins reach past float32's resolution near p = 1."""
    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.5).astype(np.int64)
    margin = np.where(labels == 1, rng.uniform(16, 30, 400), rng.uniform(-5, 20, 400))
    logits = np.stack([-margin / 2, margin / 2], axis=1).astype(np.float32)
    return logits, labels


def test_auc_and_log_loss_keep_the_ranking_of_confident_float32_logits(confident_float32):
    logits, labels = confident_float32
    margin = logits[:, 1].astype(np.float64) - logits[:, 0]
    metrics = evaluate(logits, labels, np.array(["a"] * len(labels)), "val")
    # softmax in float32 rounds every p > 1 - 6e-8 to 1.0: positives and confident negatives tie and the AUC drops.
    assert metrics["val/auc"] == pytest.approx(roc_auc_score(labels, margin))
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    assert metrics["val/log_loss"] == pytest.approx(log_loss(labels, p / p.sum(axis=1, keepdims=True)))


def test_roc_points_of_confident_float32_logits_keep_every_distinct_score(confident_float32):
    from medtriage.evaluation.metrics import softmax

    logits, labels = confident_float32
    fpr, tpr = roc_points(labels, softmax(logits))
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(labels, logits[:, 1].astype(np.float64) - logits[:, 0]))
