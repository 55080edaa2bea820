"""`-m` sweeps (scripts/train.py, scripts/cross_validate.py) whose output folder cannot be made: the sweep's parent MLflow
run was opened first, then Hydra failed to make the folder, and the parent was left RUNNING (KILLED at exit), a sweep
in the store with no job and no folder. The folder is checked before the parent is opened: no parent run, one line."""

from __future__ import annotations

import os

import pytest
from mlflow.tracking import MlflowClient

from medtriage.training.tracking import PARENT_RUN_ENV
from tests.cli.test_hydra_errors_one_line import one_line_error, run_command


@pytest.fixture
def no_exit_hooks(monkeypatch):
    """What a sweep would register to run at exit (the pytest process's exit is no sweep's)."""
    registered = []
    monkeypatch.setattr("atexit.register", lambda *args: registered.append(args))
    monkeypatch.setenv(PARENT_RUN_ENV, "restored at the end")  # whatever the command leaves, it is put back
    monkeypatch.delenv(PARENT_RUN_ENV)
    return registered


@pytest.mark.parametrize("module", ["medtriage.cli.train", "medtriage.cli.cross_validate"])
def test_a_sweep_folder_that_cannot_be_made_opens_no_parent_run(module, tmp_path, monkeypatch, capsys, no_exit_hooks):
    a_file = tmp_path / "runs.txt"
    a_file.write_text("not a folder\n")
    argv = ["-m", "experiment=pneumoniamnist", f"paths.runs_dir={a_file}", "trainer.seed=0,1"]
    code = run_command(module, argv, monkeypatch, tmp_path)
    one_line_error(code, capsys, str(a_file), "hydra.sweep.dir")
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = [(r.info.run_name, r.info.status) for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]
    assert runs == [], "a parent run was opened for a sweep whose folder could not be made"
    assert PARENT_RUN_ENV not in os.environ
    assert not [hook for hook, *_ in no_exit_hooks if getattr(hook, "__name__", "") == "_close_interrupted"]
