"""The export commands as a new ML engineer uses them after training:

- `export_ensemble.py --cross-validation DIR export.models_dir=...` took the override for a second cross-validation
  folder ("export.models_dir=...: no fold models found"), so the documented overrides could not follow that option;
- a fold (or refit) run that never finished, its checkpoint a model trained part of the way, was served as a member;
- members trained on different pools were refused with the sorted set of pools, not which run used which;
- `export.py run_id=... tracking.uri=<the store training used>` was accepted and ignored: the run was looked for in
  the project's store, and "not in this tracking store" followed;
- a run trained with `tracking.log_checkpoint=false` was answered with a command to log "<path of best.pt>" to a
  client of MLflow's default store, not the run's checkpoint to the run's store."""

from __future__ import annotations

from dataclasses import asdict
from types import SimpleNamespace

import pytest

pytest.importorskip("mlflow", reason="the export commands need the [train] extra")

import mlflow  # noqa: E402 -- after the skip

from medtriage.cli import export as export_cli  # noqa: E402

RUN_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def no_project_store(monkeypatch):
    """The tracking store is the test's own (tests/conftest.py), not the project's mlflow.db."""
    monkeypatch.setattr(export_cli, "_use_project_store", lambda: None)


def cross_validation_folder(tmp_path, finished=(True, True)):
    cv_dir = tmp_path / "cv"
    for fold, done in enumerate(finished):
        (cv_dir / f"fold{fold}" / "checkpoints").mkdir(parents=True)
        (cv_dir / f"fold{fold}" / "checkpoints" / "last.pt").write_bytes(b"")
        if done:
            (cv_dir / f"fold{fold}" / "metrics.json").write_text("{}")
    return cv_dir


@pytest.fixture
def fold_exports(monkeypatch, tmp_path):
    """export_fold_ensemble stood in for: what it was asked."""
    asked = []

    def export(cv_dirs, name, tta="none", overrides=()):
        asked.append((list(cv_dirs), list(overrides)))
        return SimpleNamespace(package_dir=tmp_path / "models" / name, run_id="r1")

    monkeypatch.setattr("medtriage.export.fold_ensemble.export_fold_ensemble", export)
    return asked


def test_overrides_after_the_cross_validation_folder_are_overrides(tmp_path, fold_exports):
    cv_dir = cross_validation_folder(tmp_path)
    models = f"export.models_dir={tmp_path}/models"
    assert export_cli.ensemble_main(["--name", "folds", "--cross-validation", str(cv_dir), models, "export.tta=none"]) == 0
    assert fold_exports == [([cv_dir], [models, "export.tta=none"])]


def test_a_fold_run_that_did_not_finish_is_refused_not_served(tmp_path, fold_exports, capsys):
    cv_dir = cross_validation_folder(tmp_path, finished=(True, False))
    assert export_cli.ensemble_main(["--name", "folds", "--cross-validation", str(cv_dir)]) == 2
    err = capsys.readouterr().err
    assert f"error: {cv_dir / 'fold1'}: no metrics.json" in err and "run the cross-validation again" in err
    assert fold_exports == []


def test_members_of_different_pools_are_named_with_their_run(tmp_path, monkeypatch, capsys):
    from medtriage.export import ensemble
    from medtriage.model.checkpoint import save_checkpoint
    from medtriage.model.networks import PreprocessSpec, build_triage_net

    spec = PreprocessSpec(size=28, in_channels=1)
    weights = build_triage_net("resnet10", 2, spec).state_dict()
    pools = [str(tmp_path / "pool-b"), str(tmp_path / "pool-a")]  # run 0 trained on b: a sorted list reads the other way

    def checkpoint(run_id, folder):
        config = {"model": {"name": "resnet10", "stem_stride": 2, "preprocess": asdict(spec)}}
        config["data"] = {"label_names": ["normal", "pneumonia"], "pool_dir": pools[int(run_id)]}
        return save_checkpoint(folder / "best.pt", model=weights, config=config)

    monkeypatch.setattr(ensemble, "find_checkpoint", checkpoint)
    monkeypatch.setattr(ensemble, "check_finished_run", lambda run_id: None)
    assert export_cli.ensemble_main(["--name", "ens", "0", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{pools[0]} in run 0" in err and f"{pools[1]} in run 1" in err


def test_a_tracking_uri_override_names_the_store_the_run_is_looked_up_in(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(
        "medtriage.export.from_mlflow.export_from_mlflow",
        lambda run_id, overrides: asked.append((run_id, list(overrides), mlflow.get_tracking_uri())),
    )
    store = f"sqlite:///{tmp_path}/runs.db"
    assert export_cli.main([f"run_id={RUN_ID}", f"tracking.uri={store}", "export.name=x"]) == 0
    assert asked == [(RUN_ID, ["export.name=x"], store)]


def test_a_run_without_its_checkpoint_logged_is_answered_with_its_checkpoint_and_store(tmp_path, capsys):
    output_dir = tmp_path / "runs" / "2026-01-01_00-00-00"
    (output_dir / "checkpoints").mkdir(parents=True)
    (output_dir / "checkpoints" / "best.pt").write_bytes(b"")
    client = mlflow.MlflowClient()
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    client.log_param(run_id, "paths.output_dir", str(output_dir))
    client.log_param(run_id, "tracking.log_checkpoint", "False")
    client.set_terminated(run_id, "FINISHED")
    assert export_cli.main([f"run_id={run_id}"]) == 2
    err = capsys.readouterr().err
    logged = f"mlflow.MlflowClient('{mlflow.get_tracking_uri()}').log_artifact('{run_id}', '{output_dir}/checkpoints/best.pt'"
    assert "has no checkpoint artifact" in err and logged in err
