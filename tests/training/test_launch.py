"""Launching a run: values no run can use fail before any work, a resume continues the interrupted run in its own
store, and a run stopped by SIGTERM or Ctrl-C does not stay RUNNING in MLflow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from medtriage import training
from medtriage.config import compose_train_config
from medtriage.errors import ConfigError
from medtriage.signals import terminate_as_interrupt
from tests.training.conftest import ROOT, tiny_recipe

MISSING_NPZ = "data.npz_path=/nonexistent/pneumoniamnist.npz"  # reaching the data would fail with DataNotFoundError


def _tiny(tmp_path: Path, npz_cache_dir: Path, run: str, *extra: str):
    runs = tmp_path / "outputs"
    return compose_train_config([*tiny_recipe(runs, npz_cache_dir), f"paths.output_dir={runs / 'pneumoniamnist' / run}", *extra])


def _statuses(uri: str) -> list[str]:
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [r.info.status for r in client.search_runs(experiments)]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.batch_size=0", "data.batch_size"),
        ("trainer.eval_batch_size=0", "trainer.eval_batch_size"),
        ("trainer.lr=-0.001", "trainer.lr"),
        ("data.num_workers=-1", "data.num_workers"),
        ("trainer.min_lr_ratio=2", "trainer.min_lr_ratio"),
        ("trainer.mixup_alpha=-0.2", "trainer.mixup_alpha"),
        ("model.preprocess.std=0", "model.preprocess.std"),
        ("trainer.max_epochs=0", "trainer.max_epochs"),
        ("data.augment.stain_sigma=0.3", "model.preprocess.in_channels=1"),
    ],
)
def test_a_value_no_run_can_use_fails_before_any_data_work_naming_the_key(tmp_path, npz_cache_dir, override, key):
    cfg = _tiny(tmp_path, npz_cache_dir, "bad", MISSING_NPZ, override)
    with pytest.raises(ConfigError) as err:
        training.run(cfg)
    assert err.value.where == "config" and key in str(err.value)


def test_a_new_run_in_a_folder_holding_an_unfinished_runs_checkpoints_is_refused_before_any_data_work(tmp_path, npz_cache_dir):
    """A fixed paths.output_dir used again while the run there can still be continued: it would be written over."""
    from medtriage.model.checkpoint import LAST, read_checkpoint, save_checkpoint

    cfg = _tiny(tmp_path, npz_cache_dir, "fixed", MISSING_NPZ)
    earlier = save_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / LAST, model={}, mlflow_run_id="0123abcd")
    with pytest.raises(ConfigError, match="an earlier run that did not finish \\(MLflow run 0123abcd\\)") as err:
        training.run(cfg)
    assert err.value.where == str(earlier.parent) and f"trainer.resume_from={earlier}" in err.value.hint
    assert read_checkpoint(earlier)["mlflow_run_id"] == "0123abcd"


def test_a_new_run_in_a_finished_runs_folder_replaces_its_checkpoints_and_metrics(tmp_path, npz_cache_dir):
    """Left there, the earlier run's metrics.json would mark the new run finished: once interrupted, a resume would
    refuse it."""
    from medtriage.errors import DataNotFoundError
    from medtriage.model.checkpoint import BEST, LAST, save_checkpoint

    cfg = _tiny(tmp_path, npz_cache_dir, "fixed", MISSING_NPZ)
    folder = Path(cfg.paths.output_dir)
    earlier = [save_checkpoint(folder / "checkpoints" / name, model={}, mlflow_run_id="0123abcd") for name in (LAST, BEST)]
    (folder / "metrics.json").write_text("{}")
    with pytest.raises(DataNotFoundError):  # reached the (missing) data: past the folder's check
        training.run(cfg)
    assert not any(path.exists() for path in [*earlier, folder / "metrics.json"])


def test_a_new_run_removes_a_metrics_file_its_folder_holds_without_checkpoints(tmp_path, npz_cache_dir):
    """Left by a run whose checkpoints were deleted, it would mark this run finished: a resume would refuse it."""
    from medtriage.errors import DataNotFoundError

    cfg = _tiny(tmp_path, npz_cache_dir, "fixed", MISSING_NPZ)
    stale = Path(cfg.paths.output_dir) / "metrics.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    with pytest.raises(DataNotFoundError):  # reached the (missing) data: past the folder's check
        training.run(cfg)
    assert not stale.exists()


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ("export.threshold_rule=sensitivty", "export.threshold_rule"),
        ("export.urgent_rule=youdens", "export.urgent_rule"),
        ("export.threshold_target=95", "export.threshold_target"),
        ("export.tta=mirror", "export.tta"),
        ("export.slide_aggregation=max", "export.slide_aggregation"),
        ("export.ood_false_alarm_rate=1", "export.ood_false_alarm_rate"),
    ],
)
def test_an_export_setting_that_cannot_work_fails_before_the_training(tmp_path, npz_cache_dir, monkeypatch, override, where):
    from medtriage.workflows.train_and_export import train_and_export

    monkeypatch.setattr(training, "run", lambda cfg: pytest.fail("trained with an export setting that cannot work"))
    with pytest.raises(ConfigError) as err:
        train_and_export(_tiny(tmp_path, npz_cache_dir, "bad-export", "export.enabled=true", override))
    assert err.value.where == where


def test_cross_validation_with_one_fold_fails_before_its_mlflow_run(tmp_path, npz_cache_dir, tracking_uri):
    from medtriage.workflows.cross_validation import cross_validate

    overrides = [*tiny_recipe(tmp_path / "outputs", npz_cache_dir), MISSING_NPZ, "cv.folds=1"]
    with pytest.raises(ConfigError, match=r"cv\.folds=1 \(must be 2 or more\)"):
        cross_validate(overrides, tmp_path / "cv")
    assert _statuses(tracking_uri) == []


def test_an_interrupted_cross_validation_ends_its_run_killed(tmp_path, npz_cache_dir, tracking_uri, monkeypatch):
    from medtriage.workflows import cross_validation

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cross_validation, "_run_folds", ctrl_c)  # once its MLflow run is made (a refusal before makes none)
    with pytest.raises(KeyboardInterrupt):
        cross_validation.cross_validate(tiny_recipe(tmp_path / "outputs", npz_cache_dir), tmp_path / "cv")
    assert _statuses(tracking_uri) == ["KILLED"]


def test_resume_continues_the_interrupted_run_not_a_newer_finished_one(tmp_path, npz_cache_dir):
    recipe = ("trainer.max_epochs=2", "data.limit=64")
    interrupted = training.run(_tiny(tmp_path, npz_cache_dir, "a", *recipe, "trainer.stop_after_epochs=1"))
    finished = training.run(_tiny(tmp_path, npz_cache_dir, "b", *recipe))
    assert interrupted.interrupted and finished.finished
    resumed = training.run(_tiny(tmp_path, npz_cache_dir, "c", *recipe, "trainer.resume=true"))
    assert resumed.run_id == interrupted.run_id and resumed.output_dir == interrupted.output_dir
    with pytest.raises(ConfigError, match="names a run that finished"):  # named outright, it is refused
        training.run(_tiny(tmp_path, npz_cache_dir, "d", *recipe, f"trainer.resume_from={finished.output_dir}"))


def test_resuming_against_another_tracking_store_names_the_run_and_the_store(tmp_path, npz_cache_dir, monkeypatch, empty_mlflow_db):
    recipe = ("trainer.max_epochs=2", "data.limit=64")
    interrupted = training.run(_tiny(tmp_path, npz_cache_dir, "a", *recipe, "trainer.stop_after_epochs=1"))
    other = tmp_path / "other.db"
    shutil.copyfile(empty_mlflow_db, other)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")  # a new shell without the run's store
    with pytest.raises(ConfigError) as err:
        training.run(_tiny(tmp_path, npz_cache_dir, "b", *recipe, "trainer.resume=true"))
    assert interrupted.run_id in str(err.value) and str(other) in str(err.value) and err.value.where == "tracking.uri"


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGHUP"])
def test_a_run_stopped_by_a_signal_ends_killed_not_running(tmp_path, npz_cache_dir, tracking_uri, signum):
    """A SLURM time limit or preemption, or a failed fold stopping the others, sends SIGTERM; a closed terminal or SSH
    session sends SIGHUP (before, its default action left the run RUNNING)."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from medtriage.config import compose_train_config
        from medtriage.training import job
        from tests.training.conftest import tiny_recipe

        def terminated(*args, **kwargs):
            os.kill(os.getpid(), signal.{signum})
            raise AssertionError("{signum} did not stop the run")

        job.train_epochs = terminated
        runs = {str(tmp_path / "outputs")!r}
        job.run(compose_train_config([*tiny_recipe(runs, {str(npz_cache_dir)!r}), "paths.output_dir=" + runs + "/run"]))
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode != 0
    assert _statuses(tracking_uri) == ["KILLED"], done.stderr[-3000:]
    assert "interrupted before its first epoch was checkpointed: nothing to resume" in done.stdout  # stopped in epoch 1


def test_a_second_signal_while_the_run_ends_killed_is_raised_once_the_status_is_written(tracking_uri, monkeypatch):
    """A scheduler sends SIGTERM again (or a user presses Ctrl-C twice) while the first one's KILLED is being written."""
    import signal

    import mlflow

    from medtriage.training import tracking

    write_status = MlflowClient.set_terminated

    def signalled_meanwhile(client, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return write_status(client, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_terminated", signalled_meanwhile)
    mlflow.start_run()
    with terminate_as_interrupt(), pytest.raises(KeyboardInterrupt, match="while the run's status was written"):
        tracking.end_run("KILLED")
    assert _statuses(tracking_uri) == ["KILLED"]


def test_an_interrupted_cross_validation_stops_the_folds_it_started(tmp_path, monkeypatch):
    from medtriage.workflows import cross_validation

    started = []
    popen = subprocess.Popen

    def record(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    def interrupted(running, folds):  # SIGTERM to this process alone, while its folds train
        raise KeyboardInterrupt

    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    monkeypatch.setattr(cross_validation, "fold_command", lambda *args: sleeper)
    monkeypatch.setattr(cross_validation.subprocess, "Popen", record)
    monkeypatch.setattr(cross_validation, "_finished", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cross_validation._run_folds([], 3, tmp_path, 2, "cv", "run")
    assert len(started) == 2 and all(process.poll() is not None for process in started)


REFIT = ["data.refit=true", "trainer.weights=last", "trainer.early_stopping_patience=null"]


def test_a_refit_that_a_sweeper_would_optimise_is_refused_before_any_training(tmp_path, monkeypatch, capsys):
    """A refit has no validation split: every Optuna trial would be scored -inf, and the search would pick at random."""
    from tests.cli.test_cli_bad_inputs import run_hydra_main

    def no_training(cfg):
        raise AssertionError("the refit trained")

    monkeypatch.setattr(training, "run", no_training)
    sweep = ["hydra/sweeper=optuna", "hydra.sweeper.direction=maximize"]
    code = run_hydra_main("medtriage.cli.train", ["experiment=pneumoniamnist", *REFIT, *sweep], tmp_path, monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "data.refit" in err and "no validation split" in err and "scripts/cross_validate.py" in err


def test_a_refit_outside_an_optimising_sweep_still_trains(tmp_path, npz_cache_dir, monkeypatch):
    """Several refits under the basic sweeper (`-m trainer.seed=0,1,2`), or one alone: nothing scores them."""
    from medtriage.training.job import RunResult
    from medtriage.workflows.train_and_export import train_and_export

    trained = []
    monkeypatch.setattr(training, "run", lambda cfg: trained.append(cfg) or RunResult("", float("-inf"), tmp_path, tmp_path))
    train_and_export(_tiny(tmp_path, npz_cache_dir, "a", *REFIT))
    assert len(trained) == 1
