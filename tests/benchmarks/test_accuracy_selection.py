"""The selection rule of benchmarks.accuracy_selection: the default recipe stays unless beaten beyond the folds' noise."""

from __future__ import annotations

from types import SimpleNamespace

from benchmarks.accuracy_selection import choose


class FoldHistory:
    """Stands in for an MLflow client: `cv/log_loss` per fold of each trial run."""

    def __init__(self, losses: dict[str, list[float]]):
        self.losses = losses

    def get_metric_history(self, run_id: str, key: str):
        assert key == "cv/log_loss"
        return [SimpleNamespace(step=i, value=v) for i, v in reversed(list(enumerate(self.losses[run_id])))]


def cv_of(losses: dict[str, list[float]]) -> dict:
    return {label: {"run_id": label, "mean_log_loss": sum(v) / len(v)} for label, v in losses.items()}


def test_a_challenger_better_on_every_fold_replaces_the_default():
    losses = {"default": [0.10, 0.12, 0.11], "a": [0.08, 0.10, 0.09], "b": [0.09, 0.11, 0.10]}
    assert choose(cv_of(losses), FoldHistory(losses)) == "a"


def test_a_gain_within_the_folds_noise_keeps_the_default():
    losses = {"default": [0.0561, 0.0800, 0.0760], "tie": [0.0562, 0.0800, 0.0755], "noisy": [0.03, 0.10, 0.07]}
    assert choose(cv_of(losses), FoldHistory(losses)) == "default"
