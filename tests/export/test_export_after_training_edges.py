"""An export that fails after a finished training, and exports from MLflow runs that cannot be exported:
each says what happened, where, and what to do (never an MLflow traceback, never a training that reads as lost)."""

from __future__ import annotations

import shutil
from dataclasses import asdict

import mlflow
import pytest
from omegaconf import OmegaConf

from medtriage import training
from medtriage.errors import ConfigError, DataNotFoundError
from medtriage.training.job import RunResult


@pytest.fixture
def finished_run(tmp_path, monkeypatch):
    """A training that finished (training.run answers it at once) with a real, untrained checkpoint."""
    from medtriage.model.checkpoint import save_checkpoint
    from medtriage.model.networks import PreprocessSpec, build_triage_net

    spec = PreprocessSpec(size=28, in_channels=1)
    config = {"model": {"name": "resnet10", "stem_stride": 2, "preprocess": asdict(spec)}, "data": {"label_names": ["a", "b"]}}
    net = build_triage_net("resnet10", 2, spec)
    checkpoint = save_checkpoint(tmp_path / "checkpoints" / "best.pt", model=net.state_dict(), config=config)
    result = RunResult(run_id="3f2a9c", best_val_auc=0.9, checkpoint=checkpoint, output_dir=checkpoint.parent)
    monkeypatch.setattr(training, "run", lambda cfg: result)
    return result


def _train_config(tmp_path, log_checkpoint: bool = True):
    return OmegaConf.create(
        {
            "export": {"enabled": True, "models_dir": str(tmp_path / "models"), "name": "x"},
            "data": {"pool_dir": str(tmp_path / "no-pool")},  # the export fails: no pool to calibrate on
            "tracking": {"log_checkpoint": log_checkpoint},
        }
    )


def test_a_failed_export_after_training_says_the_training_is_kept_and_how_to_export_again(finished_run, tmp_path):
    from medtriage.workflows.train_and_export import train_and_export

    with pytest.raises(DataNotFoundError) as err:
        train_and_export(_train_config(tmp_path))
    message = str(err.value)
    assert "no pooled manifest" in message and err.value.where == str((tmp_path / "no-pool").resolve())
    assert "training itself finished and is kept" in message and str(finished_run.checkpoint) in message
    assert "python scripts/export.py run_id=3f2a9c" in message


def test_with_the_checkpoint_kept_out_of_mlflow_the_retry_logs_it_first(finished_run, tmp_path):
    from medtriage.workflows.train_and_export import train_and_export

    with pytest.raises(DataNotFoundError) as err:
        train_and_export(_train_config(tmp_path, log_checkpoint=False))
    assert f"log_artifact('3f2a9c', '{finished_run.checkpoint}', 'checkpoints')" in str(err.value)


def test_an_unwritable_models_folder_after_training_keeps_its_error_and_adds_the_retry(finished_run, tmp_path, monkeypatch):
    import medtriage.workflows.train_and_export as workflow

    def unwritable(**kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "models"))

    monkeypatch.setattr(workflow, "export_run", unwritable)
    with pytest.raises(PermissionError) as err:
        workflow.train_and_export(_train_config(tmp_path))
    (note,) = err.value.__notes__
    assert "training itself finished and is kept" in note and "python scripts/export.py run_id=3f2a9c" in note


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """An MLflow SQLite store with its tables made once (making them takes seconds, copying it does not)."""
    path = tmp_path_factory.mktemp("mlflow") / "empty.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path, monkeypatch, empty_store) -> str:
    """This test's own store (a copy of the empty one), as MLFLOW_TRACKING_URI."""
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return uri


def _run_in(status: str) -> str:
    """A run of the current store, ended with `status` (RUNNING: never ended), holding no checkpoint."""
    client = mlflow.MlflowClient()
    run = client.create_run(client.create_experiment("export-edges"))
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_an_unknown_run_id_names_the_store_without_a_traceback(store, capsys):
    from medtriage.cli.export import main

    assert main(["run_id=0123456789abcdef0123456789abcdef"]) == 2
    error = capsys.readouterr().err
    assert "0123456789abcdef0123456789abcdef is not in this tracking store" in error and "MLFLOW_TRACKING_URI" in error
    assert store in error


@pytest.mark.parametrize("status", ["RUNNING", "KILLED", "FAILED"])
def test_a_run_whose_training_did_not_finish_is_refused(store, status):
    from medtriage.export.from_mlflow import export_from_mlflow

    run_id = _run_in(status)
    with pytest.raises(ConfigError, match=f"{run_id} is {status}, not FINISHED") as err:
        export_from_mlflow(run_id)
    assert "trainer.resume=true" in err.value.hint


def test_an_ensemble_member_whose_training_did_not_finish_is_refused(store, tmp_path):
    from medtriage.export.ensemble import load_members

    run_id = _run_in("KILLED")
    with pytest.raises(ConfigError, match=f"{run_id} is KILLED, not FINISHED"):
        load_members([run_id], tmp_path)


def test_a_finished_run_without_a_checkpoint_says_so(store):
    from medtriage.export.from_mlflow import export_from_mlflow

    run_id = _run_in("FINISHED")
    with pytest.raises(DataNotFoundError, match=f"MLflow run {run_id} has no checkpoint artifact") as refused:
        export_from_mlflow(run_id)
    assert refused.value.where == mlflow.get_tracking_uri()  # the store it looked in


def test_the_script_looks_in_the_store_training_writes_to_wherever_it_runs(empty_store, tmp_path, monkeypatch, capsys):
    """tracking.uri (the project's mlflow.db without MLFLOW_TRACKING_URI), as training uses, not an mlflow.db in the
    working folder."""
    from medtriage.cli.export import main
    from medtriage.config import find_project_root

    root = tmp_path / "project"
    root.mkdir()
    (root / "configs").symlink_to(find_project_root() + "/configs")
    monkeypatch.setenv("MEDTRIAGE_ROOT", str(root))
    shutil.copyfile(empty_store, root / "mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")  # the project's store, as training would record in it
    run_id = _run_in("FINISHED")
    mlflow.set_tracking_uri(None)  # a fresh shell: no MLFLOW_TRACKING_URI
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    assert main([f"run_id={run_id}"]) == 2
    assert f"MLflow run {run_id} has no checkpoint artifact" in capsys.readouterr().err  # found, in the project's store
