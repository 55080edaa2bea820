"""Ensembles and test-time views as one ONNX graph, and npz scoring through a package's ONNX session."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from medtriage.errors import ConfigError
from medtriage.model.averaging import EnsembleNet
from medtriage.model.networks import PreprocessSpec, build_triage_net
from tests.export.tiny_package import NPZ


def tiny_net(seed: int, size: int = 28):
    torch.manual_seed(seed)
    return build_triage_net("resnet10", 2, PreprocessSpec(size=size)).eval()


def test_ensemble_averages_member_probabilities_over_flips():
    members = [tiny_net(0), tiny_net(1)]
    pixels = torch.rand(3, 1, 28, 30)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(m(v), -1) for m in members for v in (pixels, pixels.flip(3))]).mean(0)
        got = EnsembleNet(members, tta="flip")(pixels).exp()
        plain = EnsembleNet(members)(pixels).exp()
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got.sum(-1), torch.ones(3), atol=1e-5)
    assert not torch.allclose(plain, got, atol=1e-4)  # the flipped view does change the result


def test_flip_tta_makes_the_model_mirror_invariant():
    net = EnsembleNet([tiny_net(2)], tta="flip")
    pixels = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(net(pixels), net(pixels.flip(3)), atol=1e-5)


def test_members_must_read_pixels_alike_though_their_input_sizes_may_differ():
    other_intensity = build_triage_net("resnet10", 2, PreprocessSpec(size=28, intensity="per_image"))
    with pytest.raises(ConfigError, match="preprocess differently"):
        EnsembleNet([tiny_net(0, 28), other_intensity])
    assert EnsembleNet([tiny_net(0, 28), tiny_net(1, 32)]).sizes == [28, 32]


@pytest.mark.slow
def test_ensemble_exports_to_one_onnx_graph_with_parity(tmp_path):
    from medtriage.config.schema import ExportConfig
    from medtriage.data.sources.medmnist import PNEUMONIA_LABELS, as_chw, read_npz
    from medtriage.evaluation.predictions import Predictions
    from medtriage.export.run import export_model
    from medtriage.serve.package import load_package
    from medtriage.serve.predictor import Predictor

    images, labels = read_npz(NPZ)["val"]
    pick = np.random.default_rng(0).choice(len(labels), 96, replace=False)
    pixels = np.stack([as_chw(image) for image in images[pick]])
    net = EnsembleNet([tiny_net(4), tiny_net(3)], tta="flip")
    with torch.no_grad():
        logits = net(torch.from_numpy(pixels)).numpy()
    cfg = ExportConfig(models_dir=str(tmp_path), name="ens", parity_images=8, log_to_mlflow=False, register_model=False)
    result = export_model(
        net, cfg, label_names=PNEUMONIA_LABELS, val=Predictions(logits, labels[pick], np.array(["a"] * 96)), parity_images=list(pixels)
    )
    assert result.meta["parity"]["max_abs_diff"] <= 1e-4
    predictor = Predictor(load_package(result.package_dir))
    served = predictor.probabilities(pixels[:8])
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(pixels[:8])) / result.meta["calibration"]["temperature"], -1).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-4)


def test_npz_test_split_scored_through_the_package_reproduces_the_torch_auc(exported, capsys):
    """`medtriage score PKG --npz ... --split test --json`: same AUC from the served ONNX as from PyTorch."""
    from medtriage.cli import main
    from medtriage.data.sources.medmnist import as_chw, read_npz

    result, torch_model = exported
    assert main(["score", str(result.package_dir), "--npz", str(NPZ), "--split", "test", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    served = np.array([r["probability"] for r in document["results"]])
    labels = np.array([document["labels"][r["file"]] for r in document["results"]])
    images, truth = read_npz(NPZ)["test"]
    assert len(served) == len(truth) == 624 and (labels == truth).all()
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(np.stack([as_chw(i) for i in images])))[:, 1].numpy()
    assert abs(roc_auc_score(labels, served) - roc_auc_score(truth, expected)) <= 1e-4
    assert 0.6 < roc_auc_score(labels, served) < 1.0  # a real, imperfect model


def test_npz_scoring_rejects_a_bad_split_and_file(exported, tmp_path, capsys):
    from medtriage.cli import main

    result, _ = exported
    assert main(["score", str(result.package_dir), "--npz", str(tmp_path / "missing.npz")]) == 2
    assert "npz file not found" in capsys.readouterr().err


def _member_runs(tmp_path, seeds=(0, 1)) -> tuple[str, list[str]]:
    """(experiment id, run ids) of real MLflow runs, each with a tiny net's best.pt as its checkpoint artifact."""
    from dataclasses import asdict

    import mlflow

    from medtriage.model.checkpoint import save_checkpoint

    config = {
        "model": {"name": "resnet10", "stem_stride": 2, "preprocess": asdict(PreprocessSpec(size=28))},
        "data": {"pool_dir": str(tmp_path / "pool"), "label_names": ["normal", "pneumonia"]},
        "export": {"models_dir": str(tmp_path / "models"), "name": "members"},
    }
    experiment_id = mlflow.create_experiment("members", artifact_location=str(tmp_path / "artifacts"))
    run_ids = []
    for seed in seeds:
        checkpoint = save_checkpoint(tmp_path / f"member{seed}" / "best.pt", model=tiny_net(seed).state_dict(), config=config)
        with mlflow.start_run(experiment_id=experiment_id) as run:
            mlflow.log_artifact(str(checkpoint), "checkpoints")
        run_ids.append(run.info.run_id)
    return experiment_id, run_ids


@pytest.mark.parametrize(
    ("override", "where"), [("export.opset=40", "export.opset"), ("export.positive_label=pnuemonia", "export.positive_label")]
)
def test_an_ensemble_refused_its_export_settings_leaves_no_mlflow_run_of_its_own(tmp_path, override, where):
    """Refused before the ensemble's own run is made: the tracking store keeps only the members' runs."""
    import mlflow

    from medtriage.export.ensemble import export_ensemble

    experiment_id, run_ids = _member_runs(tmp_path)
    with pytest.raises(ConfigError) as refused:
        export_ensemble(run_ids, "ens", overrides=[override])
    assert refused.value.where == where
    assert sorted(r.info.run_id for r in mlflow.MlflowClient().search_runs([experiment_id])) == sorted(run_ids)
    assert not (tmp_path / "models").exists()


def test_an_ensemble_checks_every_member_run_before_downloading_any(tmp_path):
    import mlflow

    from medtriage.errors import DataNotFoundError
    from medtriage.export.ensemble import load_members

    _, run_ids = _member_runs(tmp_path)
    with mlflow.start_run(experiment_id=mlflow.get_run(run_ids[0]).info.experiment_id) as unfinished:
        pass
    mlflow.MlflowClient().set_terminated(unfinished.info.run_id, "KILLED")
    for last, refusal, said in (
        (unfinished.info.run_id, ConfigError, "KILLED, not FINISHED"),
        ("0" * 32, DataNotFoundError, "not in this tracking store"),
        (run_ids[0], ConfigError, "given more than once"),
    ):
        with pytest.raises(refusal, match=said):
            load_members([*run_ids, last], tmp_path / "downloads")
        assert not (tmp_path / "downloads").exists()  # no member's checkpoint was downloaded first
