"""A cross-validation's fold models served as one ensemble, calibrated on their out-of-fold predictions
(`scripts/export_ensemble.py --cross-validation DIR [DIR ...]`: one cross-validation, or several cut alike), and its recipe refitted on all labelled images, calibrated on the
same out-of-fold predictions (`--refit RUN_DIR ...`)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pytest

from tests.training.conftest import ROOT, run_side_by_side, tiny_recipe

pytestmark = pytest.mark.slow

OOD_FIT_IMAGES = 256  # training images each OOD distance is fitted on: a subset of the pool's thousands, as fast to check


def last_weights(overrides: list[str]) -> list[str]:
    """The tiny recipe, ending with its last weights (as a refit must: it has no validation to choose an epoch by)."""
    kept = [o for o in overrides if not o.startswith(("data.limit", "export.enabled"))]
    return [*kept, "data.limit=48", "trainer.weights=last", "trainer.early_stopping_patience=null"]


@pytest.fixture
def recipe(tiny_overrides) -> list[str]:
    return last_weights(tiny_overrides)


@contextmanager
def own_tracking_store(folder: Path, empty_mlflow_db: Path):
    """MLflow writes into a store of its own in `folder` meanwhile (a module's fixture outlives each test's store)."""
    if not (folder / "mlflow.db").exists():
        shutil.copyfile(empty_mlflow_db, folder / "mlflow.db")
    uri, previous = f"sqlite:///{folder / 'mlflow.db'}", mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def cross_validation(tmp_path_factory, npz_cache_dir, empty_mlflow_db):
    """Two folds of the tiny recipe trained by `scripts/cross_validate.py` (test left out of both), once for the module
    in a tracking store of its own: tests read it and write elsewhere."""
    from medtriage.workflows.cross_validation import cross_validate

    base = tmp_path_factory.mktemp("fold-cv")
    with own_tracking_store(base, empty_mlflow_db):
        cross_validate([*last_weights(tiny_recipe(base / "outputs", npz_cache_dir)), "cv.folds=2", "cv.jobs=2"], base / "cv")
    return base / "cv"


@pytest.fixture(scope="module")
def fold_package(cross_validation, empty_mlflow_db):
    """The fold models of `cross_validation` exported once for the module, with one-pixel shifts (tests only read it)."""
    from medtriage.export.fold_ensemble import export_fold_ensemble

    base = cross_validation.parent
    with own_tracking_store(base, empty_mlflow_db):
        overrides = [f"export.models_dir={base / 'models'}", f"export.ood_fit_images={OOD_FIT_IMAGES}"]
        return export_fold_ensemble(cross_validation, "tiny-folds", tta="shift", overrides=overrides)


def test_fold_models_are_served_calibrated_on_images_each_scorer_held_out(cross_validation, fold_package):
    from medtriage.data.manifest import load_manifest
    from medtriage.data.torch.datasets import cache_split
    from medtriage.evaluation.calibration import fit_temperature
    from medtriage.export.fold_ensemble import fold_members
    from medtriage.model.averaging import averaged
    from medtriage.model.predict import predict_cached
    from medtriage.serve.package import load_package
    from medtriage.serve.predictor import Predictor
    from tests.io.test_dicom import sample_file

    folds = fold_package
    members = fold_members(cross_validation)
    assert len(members.nets) == len(folds.net.members) == 2
    oof, start = folds.out_of_fold, 0
    for net, config, manifest in zip(members.nets, members.configs, members.manifests, strict=True):
        held_out = cache_split(manifest, "val", net.preprocess, config["data"]["limit"], config["trainer"]["seed"])
        own = predict_cached(averaged(net, "shift"), held_out)  # the member that never trained on these images
        stop = start + len(own.labels)
        np.testing.assert_allclose(oof.logits[start:stop], own.logits, atol=1e-5)
        np.testing.assert_array_equal(oof.row_indices[start:stop], own.row_indices)
        start = stop
    assert start == len(oof.labels) and len(set(oof.row_indices.tolist())) == len(oof.labels)  # each image once

    meta = load_package(folds.package_dir).meta
    assert meta["calibration"]["split"] == "out-of-fold" and meta["drift"]["reference"]["split"] == "out-of-fold"
    assert "cross-validation on the out-of-fold scores" in meta["calibration"]["selection"]["rule"]
    expected = fit_temperature(oof.logits, oof.labels) if meta["calibration"]["method"] == "temperature" else 1.0
    assert meta["calibration"]["temperature"] == pytest.approx(expected, rel=1e-4)
    assert meta["metrics"]["val"]["overall"]["n"] == len(oof.labels)
    pool = load_manifest(members.manifests[0].pool_dir)  # its test split: left out of every fold run, scored at export
    assert meta["metrics"]["test"]["overall"]["n"] == len(pool.split("test")) > 0
    assert meta["preprocessing"]["test_time_augmentation"]["views"] == "shift"
    card = (folds.package_dir / "MODEL_CARD.md").read_text()
    assert "out-of-fold predictions" in card and "## Metrics: out-of-fold split" in card
    _check_the_ood_score_is_each_fold_models_own_on_what_it_held_out(folds, members)
    assert (
        0.0
        <= Predictor(load_package(folds.package_dir), allow_out_of_scope=True).score_file(sample_file("CT_small.dcm"))[0].probability
        <= 1.0
    )


def _check_the_ood_score_is_each_fold_models_own_on_what_it_held_out(folds, members):
    """Each member's OOD score is the one a lone network fitted on the member's own training images and held-out
    images would serve; the package serves their mean, thresholded on each held-out image's own member's score."""
    import onnxruntime as ort
    import torch

    from medtriage.config.schema import ExportConfig
    from medtriage.export.fold_ensemble import out_of_fold
    from medtriage.export.ood import fit_ood
    from medtriage.export.run import ood_data_of
    from medtriage.model.averaging import averaged

    meta = json.loads((folds.package_dir / "model.json").read_text())
    assert meta["ood"]["threshold_split"] == "out-of-fold" and meta["ood"]["fit"]["members"] == 2
    _, _, parts = out_of_fold(members, "shift")
    alone = [
        fit_ood(averaged(net, "shift"), 1.0, ood_data_of(manifest, part, ExportConfig(ood_fit_images=OOD_FIT_IMAGES)))
        for net, manifest, part in zip(members.nets, members.manifests, parts, strict=True)
    ]
    own_scores = np.concatenate([fit.val_scores for fit in alone])
    assert meta["ood"]["threshold"] == pytest.approx(float(np.quantile(own_scores, 0.99)), rel=1e-6)
    images = np.random.default_rng(0).random((3, 1, 40, 40), dtype=np.float32)
    with torch.no_grad():
        expected = np.mean([fit.model(torch.from_numpy(images))[1].numpy() for fit in alone], axis=0)
    served = ort.InferenceSession(str(folds.package_dir / "model.onnx")).run(["ood_score"], {"pixels": images})[0]
    np.testing.assert_allclose(served, expected, rtol=1e-4)


def test_cross_validations_cut_alike_serve_together_each_image_scored_by_the_mean_of_its_holders(cross_validation, recipe, tmp_path):
    """Two recipes cross-validated on the same folds, the second upsampling to another size: one package of all four
    fold models, calibrated on each image's mean over the two models that held it out (each model scoring the images
    resized to its own size), and OOD-thresholded on the same mean of their own scores."""
    import torch

    from medtriage.config.schema import ExportConfig
    from medtriage.data.torch.datasets import cache_split
    from medtriage.export.fold_ensemble import export_fold_ensemble, fold_members
    from medtriage.export.ood import fit_ood
    from medtriage.export.run import ood_data_of
    from medtriage.model.averaging import averaged
    from medtriage.model.predict import predict_cached
    from medtriage.workflows.cross_validation import cross_validate

    other = tmp_path / "cv-other"
    cross_validate([*recipe, "trainer.lr=0.01", "model.preprocess.size=40", "cv.folds=2", "cv.jobs=2"], other)  # the same cut
    both = [cross_validation, other]
    overrides = [f"export.models_dir={tmp_path / 'models'}", f"export.ood_fit_images={OOD_FIT_IMAGES}"]
    folds = export_fold_ensemble(both, "tiny-two", tta="shift", overrides=overrides)
    members = fold_members(both)
    assert members.folds == [0, 1, 0, 1] and len(folds.net.members) == 4

    oof, start, own_scores = folds.out_of_fold, 0, []
    for holders in members.holders():
        assert [members.nets[k].preprocess.spec.size for k in holders] == [28, 40]
        alone = [
            predict_cached(
                averaged(members.nets[k], "shift"),
                cache_split(members.manifests[k], "val", members.nets[k].preprocess, 48, members.configs[k]["trainer"]["seed"]),
            )
            for k in holders
        ]
        mean = np.mean([np.exp(a.logits) / np.exp(a.logits).sum(1, keepdims=True) for a in alone], axis=0)
        stop = start + len(alone[0].labels)
        np.testing.assert_allclose(np.exp(oof.logits[start:stop]), mean, atol=1e-5)
        np.testing.assert_array_equal(oof.row_indices[start:stop], alone[0].row_indices)
        fits = [
            fit_ood(
                averaged(members.nets[k], "shift"),
                1.0,
                ood_data_of(members.manifests[k], alone[0], ExportConfig(ood_fit_images=OOD_FIT_IMAGES)),
            )
            for k in holders
        ]
        own_scores.append(np.mean([fit.val_scores for fit in fits], axis=0))
        start = stop
    assert start == len(oof.labels) == len(set(oof.row_indices.tolist()))  # each labelled image once
    meta = json.loads((folds.package_dir / "model.json").read_text())
    assert meta["ood"]["fit"]["members"] == 4 and "the members that held it out" in meta["ood"]["method"]
    assert meta["preprocessing"]["resize"]["size"] == 40 and meta["preprocessing"]["resize"]["member_sizes"] == [28, 40]
    assert meta["preprocessing"]["test_time_augmentation"]["shift_px"] == [1, 1] and meta["parity"]["max_abs_diff"] <= 1e-4
    assert meta["ood"]["threshold"] == pytest.approx(float(np.quantile(np.concatenate(own_scores), 0.99)), rel=1e-6)
    card = (folds.package_dir / "MODEL_CARD.md").read_text()
    assert meta["calibration"]["split"] == "out-of-fold" and "several cross-validations" in card and "28x28 or 40x40" in card
    assert torch.isfinite(folds.net(torch.rand(2, 1, 40, 40))).all()


def test_cross_validations_cut_differently_or_given_twice_are_refused_together(tmp_path):
    from medtriage.errors import ConfigError
    from medtriage.export.fold_ensemble import _check_one_cut, fold_members

    with pytest.raises(ConfigError, match="given twice"):
        fold_members([tmp_path, tmp_path / "."])

    with pytest.raises(ConfigError, match="not cut alike"):
        _check_one_cut(["a", "b"], [[fold_config(0), fold_config(1)], [fold_config(0, seed=3), fold_config(1, seed=3)]])
    with pytest.raises(ConfigError, match="not cut alike"):
        _check_one_cut(["a", "b"], [[fold_config(0, folds=2)], [fold_config(0)]])
    _check_one_cut(["a", "b"], [[fold_config(k) for k in range(3)], [fold_config(k) for k in range(3)]])


def test_the_command_refuses_folds_of_different_cross_validations_and_a_missing_fold(cross_validation, tmp_path):
    script = [sys.executable, str(ROOT / "scripts" / "export_ensemble.py"), "--name", "bad", f"export.models_dir={tmp_path / 'models'}"]

    missing = tmp_path / "missing"
    shutil.copytree(cross_validation / "fold0", missing / "fold0")
    one_fold, no_folds, runs_and_folds = run_side_by_side(
        [
            [*script, "--cross-validation", str(missing)],
            [*script, "--cross-validation", str(tmp_path / "nowhere")],
            [*script, "run-a", "--cross-validation", str(cross_validation)],
        ],
        timeout=120,
        env=dict(os.environ),
    )
    assert one_fold.returncode == 2 and "not the 2 folds of one cross-validation" in one_fold.stderr
    assert "every fold trained" in one_fold.stderr
    assert no_folds.returncode == 2 and "no fold models found" in no_folds.stderr
    assert runs_and_folds.returncode == 2 and "one of them, not both" in runs_and_folds.stderr
    assert not (tmp_path / "models").exists()  # nothing written by a refused export


def fold_config(fold: int, folds: int = 3, seed: int = 0, pool: str = "/pools/a") -> dict:
    return {"data": {"pool_dir": pool, "cv_folds": folds, "cv_fold": fold, "cv_seed": seed, "limit": None}}


@pytest.mark.parametrize(
    "configs",
    [
        [fold_config(0), fold_config(1), fold_config(2, seed=7)],  # one fold of another cut
        [fold_config(0), fold_config(1), fold_config(2, pool="/pools/b")],  # one fold of another pool
        [fold_config(0), fold_config(1), fold_config(1)],  # a fold twice, one missing
        [{"data": {"pool_dir": "/pools/a"}}],  # not a fold run at all
    ],
)
def test_folds_that_are_not_one_cross_validation_are_refused(configs, tmp_path):
    from medtriage.errors import ConfigError
    from medtriage.export.fold_ensemble import _check_one_cross_validation

    with pytest.raises(ConfigError, match="folds of one cross-validation"):
        _check_one_cross_validation(tmp_path, configs)
    _check_one_cross_validation(tmp_path, [fold_config(k) for k in range(3)])  # the three folds of one cut pass


def refit_run(recipe: list[str], run_dir, *more: str):
    from medtriage.config import compose_train_config
    from medtriage.workflows.train_and_export import train_and_export

    return train_and_export(compose_train_config([*recipe, "data.refit=true", f"paths.output_dir={run_dir}", *more]))


def test_a_refit_learns_from_train_and_validation_and_is_served_calibrated_on_the_folds_out_of_fold_scores(
    cross_validation, fold_package, recipe, tmp_path, capsys
):
    import mlflow
    import torch

    from medtriage.export.fold_ensemble import export_refit
    from medtriage.model.checkpoint import load_model
    from medtriage.serve.package import load_package
    from medtriage.training.job import TRAINING_LOCK

    result = refit_run(recipe, tmp_path / "refit")
    said = capsys.readouterr().out
    assert "refit on all" in said and "no validation split" in said and "--refit" in said  # how to serve it
    checkpoints = sorted(p.name for p in (tmp_path / "refit" / "checkpoints").iterdir())
    assert result.package is None and checkpoints == ["last.pt", TRAINING_LOCK]  # no best.pt: nothing was validated
    run = mlflow.get_run(result.run_id)
    assert run.data.params["data.n_train"] == "48" and "data.n_val" not in run.data.params and "data.n_test" not in run.data.params
    assert not any(k.startswith(("val/", "test/", "best_val")) for k in run.data.metrics)

    folds = fold_package  # the refit is served with the same views, so it is calibrated on the same scores
    refit = export_refit(
        cross_validation, [tmp_path / "refit"], "tiny-refit", tta="shift", overrides=[f"export.models_dir={tmp_path / 'models'}"]
    )
    assert "refit: exported without an OOD score" in capsys.readouterr().out  # its members held nothing out
    np.testing.assert_allclose(refit.out_of_fold.logits, folds.out_of_fold.logits, atol=1e-6)  # the same calibration data
    meta = load_package(refit.package_dir).meta
    assert meta["calibration"]["split"] == "out-of-fold (refit)" and "ood" not in meta
    assert meta["metrics"]["test"]["overall"]["n"] == load_package(folds.package_dir).meta["metrics"]["test"]["overall"]["n"]
    assert meta["calibration"]["temperature"] == load_package(folds.package_dir).meta["calibration"]["temperature"]
    assert "refitted on all of those images" in (refit.package_dir / "MODEL_CARD.md").read_text()
    (served,) = refit.net.members  # the refit itself, not the fold models
    refit_net, _ = load_model(tmp_path / "refit" / "checkpoints" / "last.pt")
    image = torch.rand(2, 1, 40, 40, generator=torch.Generator().manual_seed(0))  # any size: the nets resize inside
    np.testing.assert_allclose(served(image).detach().numpy(), refit_net.eval()(image).detach().numpy(), atol=1e-5)


def test_a_refit_that_is_not_the_folds_recipe_or_not_a_refit_is_refused(cross_validation, recipe, tmp_path):
    from medtriage.errors import ConfigError
    from medtriage.export.fold_ensemble import export_refit

    script = [sys.executable, str(ROOT / "scripts" / "export_ensemble.py"), "--name", "bad", "--refit", str(tmp_path / "other")]
    with ThreadPoolExecutor(1) as commands:  # refused before they read a run: they need not wait for it to train
        refused = commands.submit(run_side_by_side, [script, [*script, "--cross-validation", "a", "b"]], 120, dict(os.environ))
        refit_run([*recipe, "model.preprocess.size=32"], tmp_path / "other")  # another input size: not the folds' recipe
    with pytest.raises(ConfigError, match="its model differ"):
        export_refit(cross_validation, [tmp_path / "other"], "bad", overrides=[f"export.models_dir={tmp_path / 'models'}"])
    with pytest.raises(ConfigError, match="not trained with data.refit=true"):
        export_refit(cross_validation, [cross_validation / "fold0"], "bad", overrides=[f"export.models_dir={tmp_path / 'models'}"])
    assert not (tmp_path / "models").exists()

    without_folds, two_folds = refused.result()
    assert without_folds.returncode == 2 and "--refit needs --cross-validation" in without_folds.stderr
    assert two_folds.returncode == 2 and "give one --cross-validation DIR" in two_folds.stderr


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["trainer.weights=best"], "trainer.weights=best"),
        (["trainer.early_stopping_patience=3"], "early_stopping_patience"),
        (["data.cv_folds=3"], "data.cv_folds"),
    ],
)
def test_a_refit_refuses_what_needs_a_validation_split(recipe, overrides, reason, tmp_path):
    from medtriage.config import compose_train_config
    from medtriage.errors import ConfigError
    from medtriage.training.job import check_refit

    check_refit(compose_train_config([*recipe, "data.refit=true", "paths.output_dir=."]))  # the recipe itself is fine
    with pytest.raises(ConfigError, match=reason):
        check_refit(compose_train_config([*recipe, "data.refit=true", "paths.output_dir=.", *overrides]))
