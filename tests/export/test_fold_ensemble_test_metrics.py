"""A cross-validation's fold models served as one ensemble (`export_fold_ensemble`) report their test metrics as a
single run's package does: test was left out of every fold run, so the served ensemble is scored on the pool's test
split once at export, at the thresholds set on the out-of-fold scores."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tests.export.tiny_package import NPZ, linear_probe_net

LABELS = ["normal", "pneumonia"]
SIZE = 32


def _write_pool(pool_dir, per_label: int = 32, test: bool = True):
    """Real X-rays of two sites, `per_label` of each label, every patient in one split (a third in test, or none)."""
    from medtriage.data.manifest import PoolWriter
    from medtriage.data.sources.medmnist import as_chw, read_npz

    images, labels = read_npz(NPZ)["val"]
    writer = PoolWriter(pool_dir, LABELS)
    picked = [i for label in (0, 1) for i in np.flatnonzero(labels == label)[:per_label]]
    splits = ("train", "val", "test") if test else ("train", "val")
    for n, i in enumerate(picked):
        uid = f"u{n}"
        split, site = splits[n % len(splits)], ("a", "b")[(n // len(splits)) % 2]
        ids = {"patient_id": uid, "study_uid": uid, "series_uid": uid, "sop_uid": uid, "path": uid}
        writer.add(as_chw(images[i]), site=site, label=int(labels[i]), split=split, **ids)
    return writer.close()


def _write_folds(cv_dir, pool_dir, models_dir) -> dict:
    """Two fold runs' final checkpoints (`fold<k>/checkpoints/last.pt`, as `scripts/cross_validate.py` leaves them):
    two different discriminative networks, each with its fold's resolved config; returns fold 0's config."""
    from medtriage.model.checkpoint import save_checkpoint
    from medtriage.model.networks import PreprocessSpec

    probe = linear_probe_net(SIZE)
    config = {
        "model": {"name": "resnet10", "stem_stride": 2, "preprocess": asdict(PreprocessSpec(size=SIZE, in_channels=1, mean=0.5, std=0.25))},
        "data": {"source": "npz", "npz_path": None, "pool_dir": str(pool_dir), "label_names": LABELS, "cv_folds": 2, "cv_seed": 0},
        "trainer": {"weights": "last", "seed": 0},
        "tracking": {"experiment_name": "folds"},
        "export": {"models_dir": str(models_dir), "parity_images": 8, "ood": False, "log_to_mlflow": False, "register_model": False},
    }
    for fold in (0, 1):
        weights = {k: v * (1.0 - 0.3 * fold) if k.startswith("backbone.fc") else v for k, v in probe.state_dict().items()}
        fold_config = copy.deepcopy(config)
        fold_config["data"]["cv_fold"] = fold
        save_checkpoint(cv_dir / f"fold{fold}" / "checkpoints" / "last.pt", model=weights, config=fold_config)
    return {**config, "data": {**config["data"], "cv_fold": 0}}


def _export(tmp_path, test: bool = True):
    from medtriage.export.fold_ensemble import export_fold_ensemble

    pool = _write_pool(tmp_path / "pool", test=test)
    _write_folds(tmp_path / "cv", pool.pool_dir, tmp_path / "models")
    return pool, export_fold_ensemble(tmp_path / "cv", "tiny-folds")


def _served_test_metrics_agree(pool, package_dir) -> dict:
    """model.json's test metrics are those of the package's own served scores on the pool's test split, at its review
    threshold, overall and per site; returns model.json."""
    from medtriage.serve.package import load_package
    from medtriage.serve.predictor import Predictor

    meta = json.loads((package_dir / "model.json").read_text())
    rows, positive_index = pool.split("test"), LABELS.index(meta["positive_label"])
    pixels = np.stack(list(pool.images(np.flatnonzero(pool.rows["split"].to_numpy() == "test"))))
    scores = Predictor(load_package(package_dir), allow_out_of_scope=True).probabilities(pixels)[:, positive_index]
    positive, sites = rows["label"].to_numpy() == positive_index, rows["site"].to_numpy()
    review = meta["thresholds"]["review"]["threshold"]  # set on the out-of-fold scores, not on these

    test = meta["metrics"]["test"]
    assert test["overall"] == _expected(scores, positive, review)
    assert set(test["per_site"]) == {"a", "b"}
    for site, metrics in test["per_site"].items():
        assert metrics == _expected(scores[sites == site], positive[sites == site], review)
    assert "test" in meta["calibration"]  # the calibration error on test, as a single run's package reports it
    card = (package_dir / "MODEL_CARD.md").read_text()
    assert f"## Metrics: {meta['calibration']['split']} split" in card and "## Metrics: test split (at the review threshold)" in card
    return meta


def _expected(scores: np.ndarray, positive: np.ndarray, threshold: float) -> dict:
    found = scores >= threshold
    return {
        "n": len(scores),
        "positives": int(positive.sum()),
        "auc": pytest.approx(roc_auc_score(positive, scores), abs=1e-6),
        "sensitivity": pytest.approx(found[positive].mean(), abs=1e-9),
        "specificity": pytest.approx((~found[~positive]).mean(), abs=1e-9),
    }


def test_a_fold_ensemble_reports_the_served_packages_test_metrics_overall_and_per_site(tmp_path):
    pool, folds = _export(tmp_path)
    meta = _served_test_metrics_agree(pool, folds.package_dir)
    assert meta["calibration"]["split"] == "out-of-fold"
    assert meta["metrics"]["val"]["overall"]["n"] == len(folds.out_of_fold.labels)  # out-of-fold, never test


def test_a_refit_calibrated_on_its_folds_reports_the_served_packages_test_metrics(tmp_path):
    from medtriage.export.fold_ensemble import export_refit
    from medtriage.model.checkpoint import save_checkpoint

    pool = _write_pool(tmp_path / "pool")
    config = _write_folds(tmp_path / "cv", pool.pool_dir, tmp_path / "models")
    refit = {**config, "data": {**config["data"], "cv_fold": None, "refit": True}}  # trained on train + val, not test
    save_checkpoint(tmp_path / "refit" / "checkpoints" / "last.pt", model=linear_probe_net(SIZE).state_dict(), config=refit)
    package = export_refit(tmp_path / "cv", [tmp_path / "refit"], "tiny-refit")
    assert _served_test_metrics_agree(pool, package.package_dir)["calibration"]["split"] == "out-of-fold (refit)"


def test_a_fold_ensemble_of_a_pool_without_a_test_split_reports_none(tmp_path):
    _, folds = _export(tmp_path, test=False)
    meta = json.loads((folds.package_dir / "model.json").read_text())
    assert set(meta["metrics"]) == {"val"} and "test" not in meta["calibration"]
    assert "## Metrics: test split" not in (folds.package_dir / "MODEL_CARD.md").read_text()
