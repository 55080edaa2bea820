"""A run's bookkeeping: the experiment it is tracked in, the finished mark in its own folder, and an end of run that
stays resumable until everything it records is in its MLflow run."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from medtriage import training
from medtriage.config import compose_train_config
from medtriage.errors import ConfigError
from medtriage.training import tracking
from medtriage.training.report import METRICS_FILE
from tests.training.conftest import tiny_recipe

RECIPE = ("trainer.max_epochs=2", "data.limit=64")


def _tiny(tmp_path: Path, npz_cache_dir: Path, run: str, *extra: str):
    runs = tmp_path / "outputs"
    return compose_train_config([*tiny_recipe(runs, npz_cache_dir), f"paths.output_dir={runs / 'pneumoniamnist' / run}", *RECIPE, *extra])


def test_a_deleted_experiment_is_named_with_how_to_get_it_back(tracking_uri):
    deleted = tracking.experiment_id(tracking_uri, "medtriage-gone")
    MlflowClient(tracking_uri).delete_experiment(deleted)
    with pytest.raises(ConfigError) as err:
        tracking.experiment_id(tracking_uri, "medtriage-gone")
    assert err.value.where == "tracking.experiment_name"
    assert "medtriage-gone" in err.value.reason and tracking_uri in err.value.reason
    assert "restore" in err.value.hint and deleted in err.value.hint


def test_a_resumed_checkpoint_held_directly_in_its_run_folder_marks_that_folder_finished(tmp_path, npz_cache_dir):
    interrupted = training.run(_tiny(tmp_path, npz_cache_dir, "a", "trainer.stop_after_epochs=1"))
    copied = tmp_path / "copied"
    copied.mkdir()
    shutil.copyfile(interrupted.output_dir / "last.pt", copied / "last.pt")
    resumed = training.run(_tiny(tmp_path, npz_cache_dir, "b", f"trainer.resume_from={copied / 'last.pt'}"))
    assert resumed.finished and resumed.run_id == interrupted.run_id
    assert (copied / METRICS_FILE).is_file() and not (tmp_path / METRICS_FILE).exists()
    with pytest.raises(ConfigError, match="names a run that finished"):
        training.run(_tiny(tmp_path, npz_cache_dir, "c", f"trainer.resume_from={copied}"))


def test_a_run_interrupted_while_logging_its_checkpoint_resumes_and_finishes(tmp_path, npz_cache_dir, tracking_uri, monkeypatch):
    log_artifact = mlflow.log_artifact

    def ctrl_c_on_checkpoint(local_path, artifact_path=None, *args, **kwargs):
        if artifact_path == "checkpoints":
            raise KeyboardInterrupt  # Ctrl-C while a large checkpoint uploads to the tracking server
        return log_artifact(local_path, artifact_path, *args, **kwargs)

    monkeypatch.setattr(mlflow, "log_artifact", ctrl_c_on_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        training.run(_tiny(tmp_path, npz_cache_dir, "a"))
    monkeypatch.setattr(mlflow, "log_artifact", log_artifact)
    resumed = training.run(_tiny(tmp_path, npz_cache_dir, "b", "trainer.resume=true"))
    run = MlflowClient(tracking_uri).get_run(resumed.run_id)
    assert run.info.status == "FINISHED"
    assert [a.path for a in MlflowClient(tracking_uri).list_artifacts(resumed.run_id, "checkpoints")] == ["checkpoints/best.pt"]
    assert len(MlflowClient(tracking_uri).get_metric_history(resumed.run_id, "best_epoch")) == 1  # logged before the stop
    assert (resumed.output_dir.parent / METRICS_FILE).is_file()


def test_a_run_interrupted_before_its_best_checkpoint_was_copied_ends_with_the_best_epoch(tmp_path, npz_cache_dir, monkeypatch):
    from medtriage.model.checkpoint import read_checkpoint
    from medtriage.training import loop

    copies = []

    def ctrl_c_on_the_second_best(source, path):
        copies.append(path)
        if len(copies) == 2:
            raise KeyboardInterrupt  # Ctrl-C after last.pt of a better epoch, before best.pt follows it
        return copy_atomic(source, path)

    copy_atomic = loop.copy_atomic
    monkeypatch.setattr(loop, "copy_atomic", ctrl_c_on_the_second_best)
    recipe = ("trainer.max_epochs=3", "trainer.lr=0.00003")  # epochs 1 and 2 improve on this tiny set, 3 does not
    with pytest.raises(KeyboardInterrupt):
        training.run(_tiny(tmp_path, npz_cache_dir, "a", *recipe))
    monkeypatch.setattr(loop, "copy_atomic", copy_atomic)
    resumed = training.run(_tiny(tmp_path, npz_cache_dir, "b", *recipe, "trainer.resume=true"))
    # the weights the run ends with are those of the epoch it reports as best
    assert read_checkpoint(resumed.checkpoint)["epoch"] == resumed.metrics["best_epoch"]


def test_a_deleted_experiment_fails_the_run_before_any_data_work(tmp_path, npz_cache_dir, tracking_uri, monkeypatch):
    from medtriage.training import job

    def no_data_work(*args):
        raise AssertionError("the pool was loaded before the experiment was checked")

    name = "medtriage-deleted-before-run"
    MlflowClient(tracking_uri).delete_experiment(tracking.experiment_id(tracking_uri, name))
    monkeypatch.setattr(job, "load_data", no_data_work)
    with pytest.raises(ConfigError, match="is deleted"):
        training.run(_tiny(tmp_path, npz_cache_dir, "a", f"tracking.experiment_name={name}"))


def test_a_run_interrupted_while_uploading_its_metrics_resumes_and_finishes(tmp_path, npz_cache_dir, tracking_uri, monkeypatch):
    """metrics.json in the run folder marks the run finished: written before its upload, a run stopped meanwhile would
    stay KILLED in MLflow for good, its folder refused by every resume."""
    log_artifact = MlflowClient.log_artifact

    def ctrl_c_on_metrics(client, run_id, local_path, artifact_path=None):
        if Path(local_path).name == METRICS_FILE:
            raise KeyboardInterrupt  # Ctrl-C while the run's last record uploads to the tracking server
        return log_artifact(client, run_id, local_path, artifact_path)

    monkeypatch.setattr(MlflowClient, "log_artifact", ctrl_c_on_metrics)
    with pytest.raises(KeyboardInterrupt):
        training.run(_tiny(tmp_path, npz_cache_dir, "a", "trainer.max_epochs=1"))
    monkeypatch.setattr(MlflowClient, "log_artifact", log_artifact)
    resumed = training.run(_tiny(tmp_path, npz_cache_dir, "b", "trainer.max_epochs=1", "trainer.resume=true"))
    client = MlflowClient(tracking_uri)
    assert resumed.finished and client.get_run(resumed.run_id).info.status == "FINISHED"
    assert METRICS_FILE in [a.path for a in client.list_artifacts(resumed.run_id)]
    assert (resumed.output_dir.parent / METRICS_FILE).is_file()


@pytest.mark.parametrize(
    "recipe",
    [(), ("data.refit=true", "trainer.weights=last", "trainer.early_stopping_patience=null")],
    ids=["validated", "refit"],
)
def test_an_interrupted_runs_checkpoint_is_the_last_pt_its_resume_continues(tmp_path, npz_cache_dir, recipe):
    """best.pt holds the best epoch so far (none at all in a refit), not where the run stopped: nothing of an
    interrupted run is final, and `interrupted` says so."""
    from medtriage.model.checkpoint import LAST, read_checkpoint

    interrupted = training.run(_tiny(tmp_path, npz_cache_dir, "a", *recipe, "trainer.stop_after_epochs=1"))
    assert interrupted.interrupted and not interrupted.finished
    assert interrupted.checkpoint == interrupted.output_dir / LAST
    assert read_checkpoint(interrupted.checkpoint)["epoch"] == 1


def test_a_run_resumed_without_its_best_weights_says_which_weights_it_ends_with(tmp_path, npz_cache_dir, capsys, caplog):
    """A last.pt resumed away from its best.pt (copied alone, or best.pt deleted): the best epoch's weights are gone,
    so the run ends with its last epoch's, and its summary and metrics.json name that epoch beside the best one."""
    import json

    from medtriage.model.checkpoint import BEST, LAST, read_checkpoint, save_checkpoint

    recipe = ("trainer.max_epochs=3", "trainer.early_stopping_patience=null")
    interrupted = training.run(_tiny(tmp_path, npz_cache_dir, "a", *recipe, "trainer.stop_after_epochs=2"))
    copied = tmp_path / "copied"
    copied.mkdir()
    state = read_checkpoint(interrupted.output_dir / LAST)  # epoch 2; its best epoch made the earlier one, unbeaten
    save_checkpoint(copied / LAST, **state | {"best_epoch": 1, "best_val_auc": 1.0, "epochs_since_best": 1})
    capsys.readouterr()
    resumed = training.run(_tiny(tmp_path, npz_cache_dir, "b", *recipe, f"trainer.resume_from={copied / LAST}"))
    assert resumed.checkpoint == copied / LAST and not (copied / BEST).exists()
    assert read_checkpoint(resumed.checkpoint)["epoch"] == 3
    assert resumed.metrics["best_epoch"] == 1 and resumed.metrics["final_epoch"] == 3
    assert json.loads((copied / METRICS_FILE).read_text())["final_epoch"] == 3
    assert "holds the weights of epoch 3" in capsys.readouterr().out
    assert "the weights of best epoch 1 were not kept" in caplog.text
