"""A training refused before it trains (a data file that is not there, a value the project's checks refuse) left its
timestamped folder under the runs folder: Hydra's .hydra/ copy of the config, an empty train.log (the error goes to
the terminal, not the log), checkpoints/training.lock. No MLflow run, no checkpoint: each repeated mistake added one.
Such a folder is removed; a folder the command line named (a cross-validation's fold, a SLURM job's), a folder that
holds anything else, and the folder of a run that started training stay."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from medtriage.errors import ConfigError
from medtriage.io.safe_output import held_exclusive
from tests.cli.test_hydra_errors_one_line import one_line_error, run_command


def _train(tmp_path, monkeypatch, *overrides: str, module: str = "medtriage.cli.train") -> int:
    argv = [
        "experiment=pneumoniamnist",
        "model=resnet10",
        f"paths.runs_dir={tmp_path}/runs",
        f"paths.cache_dir={tmp_path}/cache",
        "export.enabled=false",
        *overrides,
    ]
    return run_command(module, argv, monkeypatch, tmp_path)


def _folders(tmp_path) -> list[Path]:
    return sorted(p for p in (tmp_path / "runs").rglob("*") if p.is_dir() and p.parent.parent == tmp_path / "runs")


@pytest.mark.parametrize(
    ("override", "says"),
    [("data.npz_path={tmp}/missing.npz", "npz file not found"), ("trainer.lr=-1", "trainer.lr=-1.0 (must be above 0)")],
)
def test_a_run_refused_before_training_leaves_no_run_folder(override, says, tmp_path, monkeypatch, capsys):
    code = _train(tmp_path, monkeypatch, override.format(tmp=tmp_path))
    one_line_error(code, capsys, says)
    assert _folders(tmp_path) == [], [sorted(str(f.relative_to(tmp_path)) for f in d.rglob("*")) for d in _folders(tmp_path)]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_a_cross_validation_refused_before_its_folds_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    one_line_error(_train(tmp_path, monkeypatch, "trainer.lr=-1", module="medtriage.cli.cross_validate"), capsys, "trainer.lr")
    assert _folders(tmp_path) == []


def test_a_run_folder_the_command_line_named_stays(tmp_path, monkeypatch, capsys):
    """A cross-validation reads its fold's error from the train.log in the folder it named."""
    named = tmp_path / "cv" / "fold0"
    one_line_error(_train(tmp_path, monkeypatch, "trainer.lr=-1", f"hydra.run.dir={named}"), capsys, "trainer.lr")
    assert (named / ".hydra" / "config.yaml").is_file()


def _refused_folder(tmp_path) -> Path:
    folder = tmp_path / "runs" / "exp" / "2026-01-01_00-00-00"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("name: exp\n")
    (folder / "train.log").write_text("")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "training.lock").write_text("1\n")
    return folder


def _refuse(folder: Path, started: bool = False) -> None:
    from medtriage.training.refused_runs import removed_when_refused, training_started

    with pytest.raises(ConfigError), removed_when_refused(folder):
        if started:
            training_started()
        raise ConfigError("refused")


def test_the_folder_of_a_run_that_started_training_stays(tmp_path):
    folder = _refused_folder(tmp_path)
    _refuse(folder, started=True)
    assert folder.is_dir()


def test_a_folder_holding_anything_else_stays(tmp_path):
    folder = _refused_folder(tmp_path)
    (folder / "checkpoints" / "last.pt").write_bytes(b"a checkpoint of an earlier run")
    _refuse(folder)
    assert (folder / "checkpoints" / "last.pt").is_file()


def test_a_folder_another_process_trains_in_stays(tmp_path):
    """Runs started in the same second share Hydra's folder: the other one holds its checkpoints' lock."""
    folder = _refused_folder(tmp_path)
    with held_exclusive(folder / "checkpoints" / "training.lock", lambda pid: AssertionError(pid)):
        _refuse(folder)
    assert folder.is_dir()


def test_only_a_refusal_removes_it(tmp_path):
    from medtriage.training.refused_runs import removed_when_refused

    folder = _refused_folder(tmp_path)
    with pytest.raises(RuntimeError), removed_when_refused(folder):
        raise RuntimeError("a bug: its config copy helps to report it")
    assert folder.is_dir()
    _refuse(folder)
    assert not folder.exists()
