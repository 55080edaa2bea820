"""Cross-validation as users run it: `scripts/cross_validate.py -m hparams_search=...` (Optuna over folds) in MLflow."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.training.conftest import ROOT

pytestmark = pytest.mark.slow


def test_optuna_sweep_over_folds_tracks_trials_and_folds_and_never_sees_test(tmp_path, tiny_overrides, tracking_uri):
    overrides = [o for o in tiny_overrides if not o.startswith(("data.limit", "export.enabled"))]
    command = [
        sys.executable,
        str(ROOT / "scripts" / "cross_validate.py"),
        "-m",
        *overrides,
        "hparams_search=pneumoniamnist_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        "cv.folds=2",
        "cv.jobs=2",
        "data.limit=48",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("medtriage-pneumoniamnist").experiment_id])
    children_of = {}
    for run in runs:
        children_of.setdefault(run.data.tags.get("mlflow.parentRunId"), []).append(run)
    (sweep,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
    trials = children_of[sweep.info.run_id]
    assert len(trials) == 2 and all(t.data.tags["cross_validation"] == "true" for t in trials)
    assert len({t.data.params["cv.overrides"] for t in trials}) == 2  # Optuna proposed two configs
    for trial in trials:
        folds = children_of[trial.info.run_id]
        assert len(folds) == 2 and all(f.info.status == "FINISHED" for f in folds)
        assert all(not any(k.startswith("test/") for k in f.data.metrics) for f in folds)  # test never scored
        assert all("n_test" not in f.data.params for f in folds)
        losses = [f.data.metrics["val/log_loss"] for f in folds]
        assert trial.data.metrics["cv/mean_log_loss"] == pytest.approx(np.mean(losses))
        calibrated = [m.value for m in client.get_metric_history(trial.info.run_id, "cv/calibrated_log_loss")]
        assert len(calibrated) == 2 and all(0 < v < 1 for v in calibrated)
    best = min(t.data.metrics["cv/mean_calibrated_log_loss"] for t in trials)
    assert f"Best value: {best}" in done.stdout + done.stderr  # the sweeper minimised the score after temperature


def test_the_pool_is_built_once_before_folds_start_side_by_side(tmp_path, tiny_overrides, tracking_uri, monkeypatch):
    """Folds launched together would each build a missing pool, and one would read the pixels another is writing."""
    from medtriage.data.manifest import MANIFEST_FILE
    from medtriage.workflows import cross_validation

    fresh = tmp_path / "fresh_cache"
    overrides = [o for o in tiny_overrides if not o.startswith("paths.cache_dir")] + [f"paths.cache_dir={fresh}", "cv.jobs=2"]
    seen = {}

    def folds_start(*args, **kwargs):
        seen["pools"] = sorted(p.parent.name for p in fresh.rglob(MANIFEST_FILE))
        raise RuntimeError("stop before training")

    monkeypatch.setattr(cross_validation, "_run_folds", folds_start)
    with pytest.raises(RuntimeError, match="stop before training"):
        cross_validation.cross_validate(overrides, tmp_path / "cv")
    assert seen["pools"], "no pool existed when the folds were launched"


def test_a_fold_without_the_selection_score_is_named_with_what_to_do(tmp_path):
    from medtriage.errors import MedTriageError
    from medtriage.workflows.cross_validation import CrossValidation, Fold

    folds = [Fold(0, tmp_path / "fold0", {"val/calibrated_log_loss": 0.1}), Fold(1, tmp_path / "fold1", {"val/log_loss": 0.2})]
    with pytest.raises(MedTriageError, match=r"folds \[1\] have no held-out calibrated_log_loss") as error:
        CrossValidation([], folds, "trial").mean()
    assert "fold1/metrics.json" in str(error.value) and "use fewer folds or more data" in str(error.value)
