"""Cross-validation and leave-one-site-out bookkeeping: settings refused up front, each fold's own scores, every
score reported that the folds hold, and held-out sites without a test AUC named."""

from __future__ import annotations

import json
import sys

import pytest
from mlflow.tracking import MlflowClient

from medtriage.errors import ConfigError
from medtriage.training.report import METRICS_FILE
from medtriage.training.tracking import PARENT_TAG, experiment_id
from medtriage.workflows import cross_validation
from medtriage.workflows.leave_one_site_out import log_worst_site

RECIPE = ["experiment=pneumoniamnist", "trainer.max_epochs=3"]


def _no_training(monkeypatch, folds=None):
    """Neither the pool nor the folds are built: `folds`, when given, stand for the trained folds."""

    def run_folds(*args, **kwargs):
        if folds is None:
            raise AssertionError("the folds were started")
        return folds

    monkeypatch.setattr(cross_validation, "build_pool", lambda data: None)
    monkeypatch.setattr(cross_validation, "check_folds_cut", lambda manifest, cfg: None)  # no pool to cut
    monkeypatch.setattr(cross_validation, "_run_folds", run_folds)


@pytest.mark.parametrize(
    "setting", ["trainer.stop_after_epochs=1", "trainer.resume=true", "trainer.resume_from=/runs/old", "data.refit=true"]
)
def test_settings_no_fold_can_finish_with_are_refused_before_any_work(tmp_path, monkeypatch, tracking_uri, setting):
    _no_training(monkeypatch)
    with pytest.raises(ConfigError, match="cross-validation cannot train its folds") as error:
        cross_validation.cross_validate([*RECIPE, setting], tmp_path / "cv")
    assert setting.split("=")[0] in str(error.value)
    assert not MlflowClient(tracking_uri).search_experiments(filter_string="name != 'Default'")  # no trial run opened


def test_a_cross_validation_into_a_folder_holding_an_earlier_ones_folds_is_refused_before_any_work(tmp_path, monkeypatch, tracking_uri):
    from medtriage.model.checkpoint import LAST, save_checkpoint

    _no_training(monkeypatch)
    earlier = save_checkpoint(tmp_path / "cv" / "fold1" / "checkpoints" / LAST, model={}, mlflow_run_id="0123abcd")
    with pytest.raises(ConfigError, match="earlier run that did not finish \\(MLflow run 0123abcd\\)") as error:
        cross_validation.cross_validate(RECIPE, tmp_path / "cv")
    assert error.value.where == str(earlier.parent)
    assert not MlflowClient(tracking_uri).search_experiments(filter_string="name != 'Default'")  # no trial run opened


def test_a_three_class_cross_validation_reports_the_scores_its_folds_hold(tmp_path, monkeypatch, tracking_uri, capsys):
    """No Brier score exists for more than two classes: the trial is scored on the rest, not failed after its folds."""
    scores = {"val/calibrated_log_loss": 0.30, "val/log_loss": 0.40, "val/auc": 0.90, "val/acc": 0.80}
    folds = [cross_validation.Fold(i, tmp_path / f"fold{i}", {k: v + i / 100 for k, v in scores.items()}) for i in range(3)]
    _no_training(monkeypatch, folds)
    labels = "data.label_names=[normal,viral,bacterial]"
    result = cross_validation.cross_validate([*RECIPE, labels], tmp_path / "cv")

    assert result.score == pytest.approx(0.31)
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["cv/mean_auc"] == pytest.approx(0.91) and "cv/mean_brier" not in run.data.metrics
    assert "calibrated_log_loss 0.3100" in capsys.readouterr().out


def test_a_fold_is_scored_by_its_own_run_not_by_an_earlier_one_in_the_folder(tmp_path, monkeypatch):
    """A fold that ends without writing its scores fails by name, even where a reused folder holds older ones."""
    old = tmp_path / "fold0"
    old.mkdir()
    (old / METRICS_FILE).write_text(json.dumps({"val/log_loss": 0.1, "val/calibrated_log_loss": 0.1}))
    monkeypatch.setattr(cross_validation, "fold_command", lambda *args: [sys.executable, "-c", "pass"])
    with pytest.raises(cross_validation.FoldFailedError, match=r"fold 0 ended without its held-out scores") as error:
        cross_validation._run_folds([], 2, tmp_path, 1, "cv", "run")
    assert "fold0/train.log" in str(error.value)


def test_a_held_out_site_without_a_test_auc_is_named_not_dropped(tracking_uri, capsys):
    client = MlflowClient(tracking_uri)
    experiment = experiment_id(tracking_uri, "loso")
    parent = client.create_run(experiment).info.run_id
    for site, auc in [("site_a", 0.91), ("site_b", 0.84), ("site_c", None)]:  # site_c's test images: one class
        child = client.create_run(experiment, tags={PARENT_TAG: parent}).info.run_id
        client.log_param(child, "data.holdout_site", site)
        if auc is not None:
            client.log_metric(child, "test/auc", auc)
        client.set_terminated(child, "FINISHED")

    assert log_worst_site(client, parent) == {"site_a": 0.91, "site_b": 0.84}
    tags = client.get_run(parent).data.tags
    assert tags["loso.worst_site"] == "site_b" and tags["loso.sites_without_test_auc"] == "site_c"
    assert "no test AUC for held-out site(s) site_c" in capsys.readouterr().out


def test_a_held_out_site_named_with_characters_mlflow_keys_refuse_is_reported_and_the_sweep_run_finished(tracking_uri, monkeypatch):
    """A site folder may be named "St Mary's (north)": its test AUC lands on the parent under a key MLflow takes, and
    the sweep's parent run ends FINISHED, not RUNNING for good."""
    from omegaconf import OmegaConf

    from medtriage.training.tracking import PARENT_RUN_ENV
    from medtriage.workflows.leave_one_site_out import LeaveOneSiteOutParentRun

    client = MlflowClient(tracking_uri)
    experiment = experiment_id(tracking_uri, "loso")
    parent = client.create_run(experiment).info.run_id
    for site, auc in [("St Mary's (north)", 0.81), ("riverside", 0.9)]:
        child = client.create_run(experiment, tags={PARENT_TAG: parent}).info.run_id
        client.log_param(child, "data.holdout_site", site)
        client.log_metric(child, "test/auc", auc)
        client.set_terminated(child, "FINISHED")
    monkeypatch.setenv(PARENT_RUN_ENV, parent)

    LeaveOneSiteOutParentRun().on_multirun_end(OmegaConf.create({"tracking": {"uri": tracking_uri}}))
    run = client.get_run(parent)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["loso/St Mary_s _north_/test_auc"] == pytest.approx(0.81)
    assert run.data.metrics["loso/worst_site_test_auc"] == pytest.approx(0.81)
    assert run.data.tags["loso.worst_site"] == "St Mary's (north)"


def test_a_held_out_site_whose_run_was_stopped_early_is_named_as_such_not_as_a_site_of_one_class(tracking_uri, capsys):
    """`-m experiment=loso_pneumonia_sites trainer.stop_after_epochs=1`: each child ends KILLED without a test AUC."""
    client = MlflowClient(tracking_uri)
    experiment = experiment_id(tracking_uri, "loso")
    parent = client.create_run(experiment).info.run_id
    for site, status in [("site_a", "FINISHED"), ("site_b", "KILLED")]:
        child = client.create_run(experiment, tags={PARENT_TAG: parent}).info.run_id
        client.log_param(child, "data.holdout_site", site)
        client.log_metric(child, "val/auc", 0.9)
        if status == "FINISHED":
            client.log_metric(child, "test/auc", 0.88)
        client.set_terminated(child, status)

    assert log_worst_site(client, parent) == {"site_a": 0.88}
    tags = client.get_run(parent).data.tags
    assert tags["loso.unfinished_sites"] == "site_b" and "loso.sites_without_test_auc" not in tags
    out = capsys.readouterr().out
    assert "holding out site_b (KILLED) did not finish" in out and "all of one class" not in out
