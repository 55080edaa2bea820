"""An export whose package cannot reach its MLflow run leaves the models folder as it was (the loader keeps serving the
registered version), says what failed and that nothing was registered; a successful one is on disk when it returns."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest

NAME = "triage-x"


@pytest.fixture(scope="module")
def tiny_net():
    """A TriageNet small enough that its ONNX export takes well under a second."""
    import torch

    from medtriage.model.networks import Preprocess, PreprocessSpec, TriageNet

    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    return TriageNet(Preprocess(PreprocessSpec(size=8, in_channels=1)), backbone).eval()


@pytest.fixture(scope="module")
def exported_v1(tmp_path_factory, tiny_net):
    """An MLflow SQLite store in which v1 of NAME is registered, and its models folder holding that package: made once
    (a store's tables take seconds to make, copying them does not)."""
    base = tmp_path_factory.mktemp("exported-v1")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        _export(tiny_net, base / "models", _run(mlflow.MlflowClient(), base / "artifacts"))
    finally:
        mlflow.set_tracking_uri(previous)
    return base


@pytest.fixture
def store(tmp_path, monkeypatch, exported_v1):
    """This test's copy of the store (as MLFLOW_TRACKING_URI) and of the models folder, v1 registered in both."""
    shutil.copyfile(exported_v1 / "mlflow.db", tmp_path / "mlflow.db")
    shutil.copytree(exported_v1 / "models", tmp_path / "models")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient()


def _run(client, artifact_location: Path) -> str:
    return client.create_run(client.create_experiment(artifact_location.name, artifact_location=str(artifact_location))).info.run_id


def _export(net, models: Path, run_id: str, **settings) -> Path:
    from medtriage.config.schema import ExportConfig
    from medtriage.evaluation.predictions import Predictions
    from medtriage.export.run import export_tracked

    rng = np.random.default_rng(0)
    labels = np.arange(20) % 2
    logits = np.stack([-labels, labels], axis=1) + rng.normal(size=(20, 2))  # informative: the temperature fit ends soon
    val = Predictions(logits.astype(np.float32), labels, np.array(["a"] * 20))
    cfg = ExportConfig(models_dir=str(models), name=NAME, ood=False, parity_images=2, urgent_rule=None, **settings)
    images = [rng.random((1, 8, 8), dtype=np.float32) for _ in range(2)]
    return export_tracked(net, cfg, run_id, label_names=["a", "b"], val=val, parity_images=images)


def _tree(folder: Path) -> dict:
    """Every entry under `folder` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def _unloggable_run(client, tmp_path) -> str:
    """A run whose artifact location is a file: logging the package to it fails in the tracking store itself."""
    (tmp_path / "not-a-folder").write_text("")
    return _run(client, tmp_path / "not-a-folder")


def test_a_package_that_cannot_be_logged_leaves_the_registered_version_in_place(tiny_net, store, tmp_path):
    from medtriage.serve.package import load_package

    models = tmp_path / "models"
    before = _tree(models)

    with pytest.raises(OSError) as err:
        _export(tiny_net, models, _unloggable_run(store, tmp_path))

    assert _tree(models) == before  # the v2 package is gone, v1 is back, no hidden leftovers
    assert load_package(models / NAME).version == 1  # what `medtriage serve models/<name>` loads
    assert [int(v.version) for v in store.search_model_versions(f"name='{NAME}'")] == [1]
    (note,) = err.value.__notes__
    assert "logging the package to MLflow run" in note and "no version of 'triage-x' was registered" in note
    assert f"{models / NAME} holds v1 as before" in note


def test_a_first_export_into_a_folder_that_cannot_be_logged_leaves_no_package(tiny_net, store, tmp_path):
    models = tmp_path / "other-models"
    with pytest.raises(OSError) as err:
        _export(tiny_net, models, _unloggable_run(store, tmp_path))

    assert not models.exists() or _tree(models) == {}
    assert [int(v.version) for v in store.search_model_versions(f"name='{NAME}'")] == [1]
    assert f"{models / NAME} holds no package as before" in err.value.__notes__[0]


def test_without_the_registry_the_number_of_a_failed_export_is_not_given_to_the_next(tiny_net, store, tmp_path):
    """The failed export's log names v2, and its run may hold part of model_package/v2: the next export is v3."""
    from medtriage.serve.package import load_package

    models = tmp_path / "models"
    with pytest.raises(OSError) as err:
        _export(tiny_net, models, _unloggable_run(store, tmp_path), register_model=False)
    assert f"(model_package/{NAME}/v2)" in err.value.__notes__[0]
    assert load_package(models / NAME).version == 1

    run_id = _run(store, tmp_path / "run-artifacts")
    _export(tiny_net, models, run_id, register_model=False)
    assert load_package(models / NAME).version == 3
    assert [artifact.path for artifact in store.list_artifacts(run_id, f"model_package/{NAME}")] == [f"model_package/{NAME}/v3"]


def test_a_written_package_is_on_disk_before_the_export_answers(tiny_net, store, tmp_path, monkeypatch):
    """The folder that holds the package is flushed after the package is renamed into it (otherwise a power cut after
    the registry recorded the version can leave the previous package, or none, under the name)."""
    events = []
    real_rename, real_fsync = os.rename, os.fsync

    def rename(source, target, **kwargs):
        events.append(("rename", Path(target)))
        return real_rename(source, target, **kwargs)

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name what was flushed")
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "fsync", fsync)
    models = (tmp_path / "models").resolve()
    package = _export(tiny_net, models, _run(store, tmp_path / "run-artifacts"))

    placed = max(i for i, event in enumerate(events) if event == ("rename", package))
    assert ("fsync", models) in events[placed:]


def test_a_version_is_tagged_logged_only_once_its_package_is_at_its_source(tiny_net, store, tmp_path, monkeypatch):
    import medtriage.export.run as export_run
    from medtriage.export.registry import PACKAGE_STATE_TAG

    seen_while_logging = []
    log_package = export_run.log_package

    def logging_package(run_id, result):
        (version,) = [v for v in store.search_model_versions(f"name='{NAME}'") if int(v.version) == result.meta["version"]]
        seen_while_logging.append(version.tags.get(PACKAGE_STATE_TAG))
        log_package(run_id, result)

    monkeypatch.setattr(export_run, "log_package", logging_package)
    _export(tiny_net, tmp_path / "models", _run(store, tmp_path / "run-artifacts"))
    assert seen_while_logging == ["writing"]  # registered before its package was logged, and said so
    states = {int(v.version): v.tags.get(PACKAGE_STATE_TAG) for v in store.search_model_versions(f"name='{NAME}'")}
    assert states == {1: "logged", 2: "logged"}


def test_a_version_that_cannot_be_withdrawn_is_named_with_the_exports_own_error(tiny_net, store, tmp_path, monkeypatch):
    """Before, the withdrawal's error (the registry out of reach) was raised in place of the export's, and the version
    left tagged writing was not named."""
    import mlflow

    def unreachable(self, name, version):
        raise ConnectionError("the model registry cannot be reached")

    monkeypatch.setattr(mlflow.MlflowClient, "delete_model_version", unreachable)
    with pytest.raises(OSError) as err:
        _export(tiny_net, tmp_path / "models", _unloggable_run(store, tmp_path))
    (note,) = err.value.__notes__
    assert "version 2 of 'triage-x' stays registered, tagged medtriage.package_state=writing" in note
    assert "ConnectionError: the model registry cannot be reached" in note and "delete that version" in note
