import numpy as np
import pytest
from scipy.special import softmax

from medtriage.evaluation.calibration import expected_calibration_error, fit_temperature, probabilities


def sampled_labels(true_logits: np.ndarray, seed: int = 0) -> np.ndarray:
    """Labels drawn from softmax(true_logits): a perfectly calibrated source."""
    rng = np.random.default_rng(seed)
    p = softmax(true_logits, axis=1)
    return (rng.random(len(p)) < p[:, 1]).astype(int)


def make_logits(n: int = 4000, seed: int = 0) -> np.ndarray:
    z = np.random.default_rng(seed).normal(0, 2.0, n)
    return np.stack([-z / 2, z / 2], axis=1)


@pytest.mark.parametrize("true_temperature", [0.5, 3.0])
def test_temperature_recovers_how_over_or_under_confident_logits_are(true_temperature):
    logits = make_logits()
    labels = sampled_labels(logits)
    fitted = fit_temperature(logits * true_temperature, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.15)


def test_scaling_reduces_ece_of_overconfident_logits():
    logits = make_logits()
    labels = sampled_labels(logits)
    overconfident = logits * 3.0
    temperature = fit_temperature(overconfident, labels)
    before = expected_calibration_error(probabilities(overconfident), labels)
    after = expected_calibration_error(probabilities(overconfident, temperature), labels)
    assert after < before / 2
    assert after < 0.03


def test_ece_by_hand_on_two_bins():
    # Bin [0.6, 0.67): confidence 0.6, accuracy 1/2; bin [0.93, 1): confidence 0.95, accuracy 1.
    probs = np.array([[0.6, 0.4], [0.4, 0.6], [0.95, 0.05], [0.05, 0.95]])
    labels = np.array([0, 0, 0, 1])
    expected = 0.5 * abs(0.5 - 0.6) + 0.5 * abs(1.0 - 0.95)
    assert expected_calibration_error(probs, labels, n_bins=15) == pytest.approx(expected)


def test_cross_fitted_log_loss_removes_what_a_temperature_fixes_and_nothing_more():
    from sklearn.metrics import log_loss

    from medtriage.evaluation.calibration import cross_fitted_log_loss

    logits = make_logits()
    labels = sampled_labels(logits)
    calibrated = log_loss(labels, probabilities(logits))
    # Three times over-confident: the raw log-loss is far worse, the cross-fitted one close to the calibrated source's.
    assert log_loss(labels, probabilities(logits * 3.0)) > calibrated + 0.1
    assert cross_fitted_log_loss(logits * 3.0, labels) == pytest.approx(calibrated, abs=0.01)
    # Logits that carry no information stay at chance (log 2): a temperature cannot add ranking.
    noise = np.random.default_rng(1).normal(0, 1, logits.shape)
    assert cross_fitted_log_loss(noise, labels) == pytest.approx(np.log(2), abs=0.01)


def test_the_halves_split_every_class_and_refuse_a_class_too_small_to_split():
    from medtriage.evaluation.calibration import stratified_halves

    labels = np.array([0] * 5 + [1] * 8)
    first, second = stratified_halves(labels, seed=3)
    assert set(first).isdisjoint(second) and len(first) + len(second) == 13
    assert sorted(labels[first].tolist()) == [0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="at least 2 cases of each of 2 classes"):
        stratified_halves(np.array([0, 1, 1, 1]))
