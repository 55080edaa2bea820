"""Each refusal of the export names where the problem is (the run, package, file or setting) and what to do about it."""

from __future__ import annotations

import sys
from dataclasses import asdict

import mlflow
import numpy as np
import pytest
import torch
from torch import nn

from medtriage.config.schema import ExportConfig
from medtriage.errors import ConfigError, InputError, PackageError
from medtriage.evaluation.predictions import Predictions
from medtriage.model.checkpoint import save_checkpoint
from medtriage.model.networks import PreprocessSpec, build_triage_net
from tests.export.test_export_refuses_what_the_package_cannot_say import LABELS, small_net


def test_an_export_with_no_parity_images_names_its_packages_graph(tmp_path):
    from medtriage.export.run import export_model

    rng = np.random.default_rng(0)
    val = Predictions(rng.normal(size=(40, 2)).astype(np.float32), np.arange(40) % 2, np.full(40, "site-a"))
    cfg = ExportConfig(models_dir=str(tmp_path / "models"), name="small", ood=False, log_to_mlflow=False, register_model=False)
    with pytest.raises(PackageError, match="no validation images") as refused:
        export_model(small_net(), cfg, label_names=LABELS, val=val, parity_images=[])
    assert refused.value.where == str(tmp_path / "models" / "small" / "model.onnx")  # not the temporary graph's
    assert "parity_images" in refused.value.hint and "val split" in refused.value.hint
    assert not (tmp_path / "models" / "small").exists()


def test_an_export_whose_config_names_no_pool_says_how_to_name_one():
    from medtriage.export.run import export_net

    with pytest.raises(ConfigError, match="no data.pool_dir") as refused:
        export_net(small_net(), {}, {"export": {"name": "small"}}, "0123abcd")
    assert refused.value.where == "data.pool_dir"
    assert "data.pool_dir=" in refused.value.hint and "run_id=0123abcd" in refused.value.hint


def test_a_registration_that_never_gets_its_number_names_the_registered_model(monkeypatch):
    from medtriage.export import registry
    from medtriage.export.registry import Registration

    client = mlflow.MlflowClient()
    run_id = client.create_run(client.create_experiment("registry")).info.run_id
    withdrawn = Registration(run_id, "chest")
    withdrawn()
    withdrawn.withdraw()  # the registry never hands out its number again: the next try gets another one
    monkeypatch.setattr(registry, "REGISTER_ATTEMPTS", 1)
    with pytest.raises(PackageError, match="could not register a version of 'chest'") as refused:
        Registration(run_id, "chest")()
    assert "chest" in refused.value.where and mlflow.get_tracking_uri() in refused.value.where
    assert "run the export again" in refused.value.hint and "export.register_model=false" in refused.value.hint
    assert client.search_model_versions("name='chest'") == []  # each number it took was given back


def test_a_network_without_a_linear_layer_names_the_setting_that_asks_for_an_ood_score():
    from medtriage.export.ood import split_head

    with pytest.raises(PackageError, match=r"\(Sequential\) has no final linear layer") as refused:
        split_head(nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    assert refused.value.where == "export.ood"
    assert "export.ood=false" in refused.value.hint


def test_a_network_whose_last_linear_layer_is_not_its_output_names_the_setting_that_asks_for_an_ood_score():
    from medtriage.export.ood import PenultimateTap, _check_split, split_head

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 2), nn.Tanh()).eval()
    features, head = split_head(net)
    with pytest.raises(PackageError, match="not its output layer") as refused:
        _check_split(net, PenultimateTap(features), head, [np.full((1, 8, 8), 0.5, np.float32)])
    assert refused.value.where == "export.ood"
    assert "export.ood=false" in refused.value.hint


def test_a_calibration_folder_where_nothing_decodes_says_what_to_pass(tmp_path):
    from medtriage.export.quantize import calibration_images

    (tmp_path / "notes.dcm").write_text("not a DICOM file\n")
    with pytest.raises(InputError, match=r"no DICOM file in the folder decoded \(1 skipped\)") as refused:
        calibration_images(tmp_path, channels=1)
    assert refused.value.where == str(tmp_path)
    assert "folder of validation DICOM files" in refused.value.hint and ".npz" in refused.value.hint


def _small_export(tmp_path, **given):
    """export_model of small_net on 40 random validation scores, as `export_model(**given)` adds to it."""
    from medtriage.export.run import export_model

    rng = np.random.default_rng(0)
    val = Predictions(rng.normal(size=(40, 2)).astype(np.float32), np.arange(40) % 2, np.full(40, "site-a"))
    cfg = ExportConfig(models_dir=str(tmp_path / "models"), name="small", parity_images=1, log_to_mlflow=False, register_model=False)
    parity_images = given.pop("parity_images", [rng.random((1, 16, 16), dtype=np.float32)])
    return export_model(small_net(), cfg, label_names=LABELS, val=val, parity_images=parity_images, **given)


def test_an_ood_score_that_is_not_finite_on_a_parity_image_names_its_packages_graph(tmp_path):
    from medtriage.export.ood import OodData

    rng = np.random.default_rng(1)
    images = [rng.random((1, 16, 16), dtype=np.float32) for _ in range(40)]
    overflowing = np.full((1, 16, 16), 1e30, np.float32)  # its features' squared distance overflows float32
    with pytest.raises(PackageError, match="NaN or infinite OOD score on validation image 1") as refused:
        _small_export(tmp_path, parity_images=[overflowing], ood_data=OodData(images, np.arange(40) % 2, images))
    assert refused.value.where == str(tmp_path / "models" / "small" / "model.onnx")  # not the temporary graph's
    assert "export.ood=false" in refused.value.hint
    assert not (tmp_path / "models" / "small").exists()


def test_a_tile_pool_whose_slides_are_not_the_validation_tiles_names_the_field(tmp_path):
    from medtriage.export.pathology import SlideLabels, TilePool

    slides = SlideLabels(np.array(["s1", "s2"] * 15), np.array([0, 1] * 15), np.full(30, "site-a"))
    pool = TilePool({"tile_size": 16, "tile_mpp": 1.0, "stain_normalization": None}, slides)
    with pytest.raises(InputError, match="40 tile scores for 30 tiles") as refused:
        _small_export(tmp_path, tile_pool=pool)
    assert refused.value.where == "TilePool.val"
    assert "each val tile scored" in refused.value.hint and "tile_pool_of" in refused.value.hint
    assert not (tmp_path / "models" / "small").exists()


def test_ensemble_runs_trained_on_other_pools_name_the_setting_that_differs(tmp_path):
    from medtriage.export.ensemble import export_ensemble

    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("ensemble")
    spec = PreprocessSpec(size=28, in_channels=1)
    weights = build_triage_net("resnet10", 2, spec).state_dict()
    run_ids = []
    for pool in ("pool-a", "pool-b"):
        config = {"model": {"name": "resnet10", "stem_stride": 2, "preprocess": asdict(spec)}}
        config["data"] = {"label_names": LABELS, "pool_dir": str(tmp_path / pool)}
        (tmp_path / pool).mkdir()
        checkpoint = save_checkpoint(tmp_path / pool / "best.pt", model=weights, config=config)
        run_id = client.create_run(experiment_id).info.run_id
        client.log_artifact(run_id, str(checkpoint), "checkpoints")
        client.set_terminated(run_id, "FINISHED")
        run_ids.append(run_id)
    with pytest.raises(ConfigError, match="were trained on different data") as refused:
        export_ensemble(run_ids, "chest-ensemble")
    assert refused.value.where == "data.pool_dir"
    assert "same pool" in refused.value.hint
    assert not (tmp_path / "models").exists()


def test_quantising_without_the_onnx_package_names_the_install_and_how_to_add_it(tmp_path, monkeypatch):
    from medtriage.cli import build_parser

    args = build_parser().parse_args(["quantize", str(tmp_path), "--calibration", str(tmp_path / "val.npz")])
    monkeypatch.setitem(sys.modules, "onnx", None)  # as Python sees an install without the export extras
    with pytest.raises(ConfigError, match="needs the onnx package") as refused:
        args.func(args)
    assert refused.value.where == sys.prefix
    assert f"{sys.executable} -m pip install 'medtriage[train]'" in refused.value.hint


def test_an_ood_distance_that_is_not_finite_names_its_validation_image_and_the_setting_that_asks_for_an_ood_score(tmp_path):
    from medtriage.export.ood import OodData

    rng = np.random.default_rng(1)
    train = [rng.random((1, 16, 16), dtype=np.float32) for _ in range(40)]
    val = [*train[:10], np.full((1, 16, 16), 1e30, np.float32), *train[11:]]  # its features' squared distance overflows
    with pytest.raises(InputError, match=r"validation image 10 \(counting from 0, in the order given\) has a NaN or infinite") as refused:
        _small_export(tmp_path, ood_data=OodData(train, np.arange(40) % 2, val))
    assert "more after it" not in refused.value.reason  # the other images' distances are finite: only the quantile was not
    assert refused.value.where == "export.ood"
    assert "validation images" in refused.value.hint and "export.ood=false" in refused.value.hint
    assert not (tmp_path / "models" / "small").exists()


def test_a_fold_members_ood_distance_that_is_not_finite_names_its_image_among_all_the_held_out_images():
    from medtriage.export.ood import OodData, fit_ood
    from medtriage.model.averaging import EnsembleNet

    rng = np.random.default_rng(1)
    images = [rng.random((1, 16, 16), dtype=np.float32) for _ in range(40)]
    held_out = [images[:20], [*images[20:23], np.full((1, 16, 16), 1e30, np.float32), *images[24:]]]
    per_fold = [OodData(images[20:] if k == 0 else images[:20], np.arange(20) % 2, held_out[k]) for k in (0, 1)]
    data = OodData([], np.zeros(0, dtype=int), [*held_out[0], *held_out[1]], per_member=per_fold, holders=[[0], [1]])
    with pytest.raises(InputError, match=r"validation image 23 \(counting from 0") as refused:  # fold 1's image 3
        fit_ood(EnsembleNet([small_net(), small_net()]), 1.0, data)
    assert refused.value.where == "export.ood"
    assert np.all(data.val_images[23] == 1e30)


@pytest.mark.parametrize("scale", [1e30, 1e38])  # finite features whose squares overflow float32; infinite features
def test_an_ood_training_image_whose_features_overflow_is_named_not_a_validation_image(tmp_path, scale):
    from medtriage.export.ood import OodData

    rng = np.random.default_rng(1)
    images = [rng.random((1, 16, 16), dtype=np.float32) for _ in range(40)]
    train = [*images[:7], np.full((1, 16, 16), scale, np.float32), *images[8:30], np.full((1, 16, 16), scale, np.float32), *images[31:]]
    with pytest.raises(InputError, match=r"training image 7 \(counting from 0, in the order given\) has OOD features") as refused:
        _small_export(tmp_path, ood_data=OodData(train, np.arange(40) % 2, images))
    assert "1 more after it" in refused.value.reason and "validation" not in refused.value.reason
    assert refused.value.where == "export.ood"
    assert "training images" in refused.value.hint and "export.ood=false" in refused.value.hint
    assert not (tmp_path / "models" / "small").exists()


def test_a_fold_members_ood_training_image_whose_features_overflow_names_the_member_and_its_image():
    from medtriage.export.ood import OodData, fit_ood
    from medtriage.model.averaging import EnsembleNet

    rng = np.random.default_rng(1)
    images = [rng.random((1, 16, 16), dtype=np.float32) for _ in range(40)]
    trained = [images[20:], [*images[:3], np.full((1, 16, 16), 1e30, np.float32), *images[4:20]]]
    per_fold = [OodData(trained[k], np.arange(20) % 2, images[:20] if k == 0 else images[20:]) for k in (0, 1)]
    data = OodData([], np.zeros(0, dtype=int), [*images[:20], *images[20:]], per_member=per_fold, holders=[[0], [1]])
    with pytest.raises(InputError, match=r"fold member 1's training image 3 \(counting from 0") as refused:
        fit_ood(EnsembleNet([small_net(), small_net()]), 1.0, data)
    assert "more after it" not in refused.value.reason
    assert refused.value.where == "export.ood"


def test_an_ood_distance_that_is_not_finite_on_its_own_training_images_names_them_not_a_validation_image():
    from medtriage.export.ood import OodData, fit_ood

    net = small_net()
    with torch.no_grad():  # features of about 1e-20: their covariance's inverse overflows float32
        net.backbone[0].weight.mul_(1e-20)
        net.backbone[0].bias.mul_(1e-20)
    rng = np.random.default_rng(1)
    images = [rng.random((1, 16, 16), dtype=np.float32) for _ in range(40)]
    with pytest.raises(InputError, match=r"training image 0 \(counting from 0, in the order given\) has a NaN or infinite") as refused:
        fit_ood(net, 1.0, OodData(images, np.arange(40) % 2, images))
    assert "39 more after it" in refused.value.reason and "validation" not in refused.value.reason
    assert refused.value.where == "export.ood" and "export.ood=false" in refused.value.hint


@pytest.mark.parametrize("copies", [1, 3])  # one image per class; the same image, so the features never vary
def test_ood_training_features_that_do_not_vary_are_named_not_the_validation_images(copies):
    from medtriage.export.ood import OodData, fit_ood

    rng = np.random.default_rng(1)
    val = [rng.random((1, 16, 16), dtype=np.float32) for _ in range(20)]
    train = [val[0]] * (2 * copies) if copies > 1 else val[:2]
    with pytest.raises(InputError, match=r"OOD distances are 0 .* do not vary within their classes") as refused:
        fit_ood(small_net(), 1.0, OodData(train, np.arange(2 * copies) % 2, val))
    assert f"class 0: {copies}, class 1: {copies}" in refused.value.reason and "validation image " not in refused.value.reason
    assert refused.value.where == "export.ood"
    assert "2 or more of each class" in refused.value.hint and "export.ood=false" in refused.value.hint


def test_an_int8_ood_threshold_refit_on_scores_that_are_not_finite_names_the_calibration_images():
    from medtriage.export.int8_refit import refit_on_int8

    probabilities = np.full((4, 2), 0.5)
    meta = {"ood": {"false_alarm_rate": 0.25, "threshold": 1.0, "threshold_split": "val"}, "thresholds": {}}
    int8_scores = np.array([0.5, np.nan, 0.7, 0.9])
    with pytest.raises(InputError, match=r"not finite \(first at index 1: nan\)") as refused:
        refit_on_int8(meta, 1, (probabilities, np.ones(4)), (probabilities, int8_scores), None, "val")
    assert refused.value.where == "--calibration"
    assert "calibration images" in refused.value.hint and "--exclude" in refused.value.hint


def test_validation_negatives_at_one_name_the_specificity_target_no_threshold_keeps(tmp_path):
    from medtriage.export.run import export_model

    logits = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    logits[[0, 2, 4]] = [-50.0, 50.0]  # 3 of the 20 negatives score p = 1.0: specificity 0.95 needs a threshold above 1
    val = Predictions(logits, np.arange(40) % 2, np.full(40, "site-a"))
    cfg = ExportConfig(models_dir=str(tmp_path / "models"), name="small", calibrate=False, log_to_mlflow=False, register_model=False)
    with pytest.raises(InputError, match=r"no threshold in \[0, 1\] keeps specificity >= 0.95") as refused:
        export_model(small_net(), cfg, label_names=LABELS, val=val, parity_images=[np.zeros((1, 16, 16), np.float32)])
    assert refused.value.where == "export.urgent_target"  # the urgent point's, not the review one's
    assert "lower the specificity target" in refused.value.hint


@pytest.mark.parametrize(
    ("aggregation", "top_k", "setting"),
    [("max", 3, "export.slide_aggregation"), ("top_k", 0, "export.slide_top_k"), ("top_k", 2.5, "export.slide_top_k")],
)
def test_slide_scores_by_an_aggregation_serving_cannot_repeat_name_the_export_setting(aggregation, top_k, setting):
    from medtriage.export.pathology import SlideLabels, slide_scores

    slides = SlideLabels(np.array(["s1", "s1", "s2", "s2"]), np.array([0, 0, 1, 1]), np.full(4, "site-a"))
    with pytest.raises(ConfigError) as refused:
        slide_scores(np.array([0.1, 0.2, 0.8, 0.9]), slides, aggregation, top_k)
    assert refused.value.where == setting
    assert refused.value.hint


def test_quantising_a_package_whose_model_json_cannot_be_written_names_the_int8_packages_model_json(tmp_path):
    import json

    from medtriage.export.quantize import quantize_package
    from tests.export.tiny_package import NPZ

    package_dir = _small_export(tmp_path).package_dir
    meta = json.loads((package_dir / "model.json").read_text())
    meta["network"]["note"] = float("nan")  # untyped by the schema, so the package loads; JSON has no NaN to write
    (package_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(PackageError, match=r"NaN or infinite values at \$\.network\.note") as refused:
        quantize_package(package_dir, NPZ, tmp_path / "small-int8", limit=4)
    assert refused.value.where == str(tmp_path / "small-int8" / "model.json")  # not the temporary folder's
    assert refused.value.hint
    assert not (tmp_path / "small-int8").exists()


def test_a_refit_that_held_out_another_site_than_its_folds_names_data_holdout_site(tmp_path):
    from medtriage.export.fold_ensemble import _refit_model

    spec = PreprocessSpec(size=28, in_channels=1)
    model = {"name": "resnet10", "stem_stride": 2, "preprocess": asdict(spec)}
    data = {"pool_dir": str(tmp_path / "pool"), "label_names": LABELS, "holdout_site": "north", "cv_folds": 2, "cv_fold": 0}
    folds = {"model": model, "data": data, "trainer": {"seed": 0}}
    weights = build_triage_net("resnet10", 2, spec).state_dict()
    for site in ("north", "south"):  # the folds' own site, then another
        refit = {**folds, "data": {**data, "holdout_site": site, "cv_folds": None, "cv_fold": None, "refit": True}}
        save_checkpoint(tmp_path / site / "checkpoints" / "last.pt", model=weights, config=refit)
    _refit_model(tmp_path / "north", folds)
    with pytest.raises(ConfigError, match="its data.holdout_site differ") as refused:
        _refit_model(tmp_path / "south", folds)
    assert refused.value.where == str(tmp_path / "south")
    assert "data.holdout_site" in refused.value.hint and "data.refit=true" in refused.value.hint


def test_a_diverged_networks_nan_logits_name_its_checkpoint_and_say_to_train_again(tmp_path, two_site_pool):
    from medtriage.export.run import export_run

    spec = PreprocessSpec(size=28, in_channels=1)
    config = {"model": {"name": "resnet10", "stem_stride": 2, "preprocess": asdict(spec)}}
    config["data"] = {"label_names": ["normal", "pneumonia"], "pool_dir": str(two_site_pool.pool_dir)}
    weights = build_triage_net("resnet10", 2, spec).state_dict()
    weights["backbone.fc.bias"] = torch.full_like(weights["backbone.fc.bias"], float("nan"))  # as a diverged training leaves it
    checkpoint = save_checkpoint(tmp_path / "best.pt", model=weights, config=config)
    export = {"models_dir": str(tmp_path / "models"), "name": "x", "log_to_mlflow": False, "register_model": False}
    with pytest.raises(InputError, match=r"the network's validation logits: \d+ value\(s\) not finite") as refused:
        export_run(None, checkpoint, {**config, "export": export})
    assert refused.value.where == str(checkpoint)
    assert "training diverged" in refused.value.hint and "NaN loss" in refused.value.hint and "trainer.lr" in refused.value.hint
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize(
    ("values", "where"),
    [
        (np.full(100, np.nan), "drift.reference.all.input_mean"),
        (np.r_[np.linspace(0, 1, 50), np.full(50, np.inf)], "drift.reference.per_site.b.input_mean"),  # site b's alone
    ],
)
def test_a_drift_reference_of_no_finite_values_names_its_model_json_field(values, where):
    from medtriage.format.references import drift_block

    with pytest.raises(InputError, match="no finite values to build a reference distribution from") as refused:
        drift_block({"input_mean": values}, np.repeat(["a", "b"], 50))
    assert refused.value.where == where
    assert "validation images" in refused.value.hint
