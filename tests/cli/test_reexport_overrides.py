"""Overrides given to a re-export (`scripts/export.py run_id=...`, `scripts/export_ensemble.py`) that it would not read.

A trained run is exported with the config its checkpoint carries: `model.name=densenet121` or `trainer.max_epochs=3`
were merged into it and read by nothing (the package still the run's ResNet), and so were data settings other than
the pool, `export.name` and `export.tta` where --name and --tta decide, and `data.pool_dir` for fold models (their own
pools score them). Each is refused by name, before any checkpoint is downloaded, saying which overrides apply."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("mlflow", reason="the export commands need the [train] extra")

import mlflow  # noqa: E402 -- after the skip

from medtriage.cli import export as export_cli  # noqa: E402
from medtriage.errors import ConfigError  # noqa: E402
from tests.cli.test_export_command_edges import cross_validation_folder  # noqa: E402


@pytest.fixture(autouse=True)
def no_project_store(monkeypatch):
    """The tracking store is the test's own (tests/conftest.py), not the project's mlflow.db."""
    monkeypatch.setattr(export_cli, "_use_project_store", lambda: None)


@pytest.fixture
def finished_run() -> str:
    """A finished run in the test's store, without a checkpoint: an override that got past the check would be answered
    with "has no checkpoint artifact"."""
    client = mlflow.MlflowClient()
    run_id = client.create_run(client.create_experiment("reexport")).info.run_id
    client.set_terminated(run_id, "FINISHED")
    return run_id


def refusal(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("override", ["model.name=densenet121", "trainer.max_epochs=3", "data.limit=64", "+export.name=x"])
def test_an_override_the_export_does_not_read_is_refused_by_name(override, finished_run, capsys):
    assert export_cli.main([f"run_id={finished_run}", "export.tta=shift", override]) == 2
    line = refusal(capsys)
    assert f"error: {override}: " in line and "export.*" in line and "data.pool_dir" in line, line
    assert "no checkpoint" not in line


@pytest.mark.parametrize("override", ["export.tta=shift", "export.models_dir=/tmp/m", "data.pool_dir=/tmp/pool"])
def test_what_the_export_reads_gets_past_the_check(override, finished_run, capsys):
    assert export_cli.main([f"run_id={finished_run}", override]) == 2
    assert "has no checkpoint artifact" in refusal(capsys)  # looked for: the override was taken


def test_the_library_call_refuses_them_too(finished_run):
    from medtriage.export.from_mlflow import export_from_mlflow

    with pytest.raises(ConfigError) as refused:
        export_from_mlflow(finished_run, ["export.name=x", "model.preprocess.size=64"])
    assert refused.value.where == "model.preprocess.size=64"


@pytest.fixture
def fold_exports(monkeypatch, tmp_path):
    """export_fold_ensemble stood in for: the overrides it was given."""
    asked = []

    def export(cv_dirs, name, tta="none", overrides=()):
        asked.append(list(overrides))
        return SimpleNamespace(package_dir=tmp_path / "models" / name, run_id="r1")

    monkeypatch.setattr("medtriage.export.fold_ensemble.export_fold_ensemble", export)
    return asked


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("model.name=densenet121", "export.*"),
        ("data.pool_dir=/tmp/pool", "tracking.experiment_name"),  # the folds score with their own pools
        ("export.name=other", "--name"),
        ("export.tta=shift", "--tta"),
        ("export.name=folds-too", "--name"),
    ],
)
def test_a_fold_ensemble_refuses_what_it_would_not_read(override, says, tmp_path, fold_exports, capsys):
    cv_dir = cross_validation_folder(tmp_path)
    assert export_cli.ensemble_main(["--name", "folds", "--cross-validation", str(cv_dir), override]) == 2
    line = refusal(capsys)
    assert f"error: {override}: " in line and says in line, line
    assert fold_exports == []


def test_a_fold_ensemble_takes_its_export_settings_and_experiment(tmp_path, fold_exports):
    cv_dir = cross_validation_folder(tmp_path)
    taken = [f"export.models_dir={tmp_path}/models", "tracking.experiment_name=folds", "export.tta=none", "export.name=folds"]
    assert export_cli.ensemble_main(["--name", "folds", "--cross-validation", str(cv_dir), *taken]) == 0
    assert fold_exports == [taken]


@pytest.mark.parametrize("override", ["trainer.lr=0.1", "export.name=other", "tracking.experiment_name=x"])
def test_an_ensemble_of_runs_refuses_them_before_any_run_is_looked_up(override, capsys):
    assert export_cli.ensemble_main(["--name", "ens", "0" * 32, "1" * 32, override]) == 2
    line = refusal(capsys)
    assert f"error: {override}: " in line and "not in this tracking store" not in line, line
