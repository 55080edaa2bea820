"""export_run end to end: a training checkpoint in an MLflow run -> package logged to the run and registered."""

import json
from dataclasses import asdict

import mlflow
import pytest

from tests.export.tiny_package import NPZ, linear_probe_net


@pytest.fixture
def trained_run(tmp_path):
    """An MLflow run holding a checkpoint (training's format) of a small model and its pool."""
    from medtriage.data.sources.medmnist import PNEUMONIA_LABELS, build_npz_pool
    from medtriage.model.checkpoint import save_checkpoint
    from medtriage.model.networks import PreprocessSpec

    pool = build_npz_pool(NPZ, tmp_path / "pool", PNEUMONIA_LABELS)
    config = {
        "model": {"name": "resnet10", "stem_stride": 2, "preprocess": asdict(PreprocessSpec(size=32, in_channels=1))},
        "data": {"pool_dir": str(pool.pool_dir), "label_names": PNEUMONIA_LABELS},
        "export": {"models_dir": str(tmp_path / "models"), "name": "pneumonia-test", "parity_images": 8},
    }
    checkpoint = save_checkpoint(tmp_path / "best.pt", model=linear_probe_net(32).state_dict(), config=config)
    experiment_id = mlflow.create_experiment("export-test", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=experiment_id) as run:  # not set_experiment: it sets $MLFLOW_EXPERIMENT_ID for good
        mlflow.log_artifact(str(checkpoint), "checkpoints")
    return run.info.run_id, pool


@pytest.mark.slow
def test_export_from_mlflow_logs_registers_and_versions_the_package(trained_run, tmp_path):
    from medtriage.config.schema import ExportConfig
    from medtriage.export.from_mlflow import export_from_mlflow
    from medtriage.export.registry import artifact_path, registrar
    from medtriage.serve.package import load_package

    run_id, pool = trained_run
    package_dir = export_from_mlflow(run_id, ["export.threshold_rule=youden"])
    package = load_package(package_dir)
    meta = package.meta
    assert meta["thresholds"]["review"]["rule"] == "youden"
    assert meta["provenance"]["mlflow_run_id"] == run_id
    assert meta["provenance"]["data_fingerprint"] == pool.fingerprint
    assert meta["training_sites"] == ["medmnist"] and set(meta["metrics"]) == {"val", "test"}
    assert meta["metrics"]["test"]["overall"]["n"] == len(pool.split("test"))

    client, folder = mlflow.MlflowClient(), artifact_path(1, "pneumonia-test")
    logged = {a.path for a in client.list_artifacts(run_id, folder)}
    assert logged == {f"{folder}/{f}" for f in ("model.onnx", "model.json", "MODEL_CARD.md")}
    logged_meta = json.loads(open(client.download_artifacts(run_id, f"{folder}/model.json", str(tmp_path))).read())
    assert logged_meta["sha256"] == meta["sha256"]
    (version,) = client.search_model_versions("name='pneumonia-test'")
    assert int(version.version) == meta["version"] == 1 and version.run_id == run_id
    assert version.source.endswith(folder)
    assert client.get_run(run_id).data.metrics["export_parity_max_abs_diff"] <= 1e-4
    # The next export of the same name becomes version 2.
    assert registrar(run_id, ExportConfig(name="pneumonia-test"))() == 2


@pytest.mark.slow
def test_a_failed_export_leaves_no_registered_version(trained_run, monkeypatch):
    import medtriage.export.run as export_run
    from medtriage.export.from_mlflow import export_from_mlflow

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(export_run, "write_package", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_from_mlflow(trained_run[0], [])
    assert mlflow.MlflowClient().search_model_versions("name='pneumonia-test'") == []


def test_script_asks_for_a_run_id(capsys):
    from medtriage.cli.export import main

    assert main(["export.name=x"]) == 2
    assert "run_id=<mlflow run id>" in capsys.readouterr().err
