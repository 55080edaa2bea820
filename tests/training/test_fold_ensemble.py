"""A cross-validation's fold models served as one ensemble, calibrated on their out-of-fold predictions
(`scripts/export_ensemble.py --cross-validation DIR`)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.training.conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture
def cross_validation(tmp_path, tiny_overrides):
    """Two folds of the tiny recipe trained by `scripts/cross_validate.py` (test left out of both)."""
    from medtriage.workflows.cross_validation import cross_validate

    overrides = [o for o in tiny_overrides if not o.startswith(("data.limit", "export.enabled"))]
    cv_dir = tmp_path / "cv"
    cross_validate([*overrides, "data.limit=48", "cv.folds=2", "cv.jobs=2"], cv_dir)
    return cv_dir


def test_fold_models_are_served_calibrated_on_images_each_scorer_held_out(cross_validation, tmp_path, capsys):
    from medtriage.data.torch.datasets import cache_split
    from medtriage.evaluation.calibration import fit_temperature
    from medtriage.export.fold_ensemble import export_fold_ensemble, fold_members
    from medtriage.model.averaging import averaged
    from medtriage.model.predict import predict_cached
    from medtriage.serve.package import load_package
    from medtriage.serve.predictor import Predictor
    from tests.io.test_dicom import sample_file

    models = tmp_path / "models"
    folds = export_fold_ensemble(cross_validation, "tiny-folds", tta="shift", overrides=[f"export.models_dir={models}"])
    assert "without an OOD score" in capsys.readouterr().out

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
    assert meta["metrics"]["val"]["overall"]["n"] == len(oof.labels) and "test" not in meta["metrics"]  # test never scored
    assert meta["preprocessing"]["test_time_augmentation"]["views"] == "shift"
    card = (folds.package_dir / "MODEL_CARD.md").read_text()
    assert "out-of-fold predictions" in card and "## Metrics: out-of-fold split" in card
    assert (
        0.0
        <= Predictor(load_package(folds.package_dir), allow_out_of_scope=True).score_file(sample_file("CT_small.dcm"))[0].probability
        <= 1.0
    )


def test_the_command_refuses_folds_of_different_cross_validations_and_a_missing_fold(cross_validation, tmp_path):
    script = [sys.executable, str(ROOT / "scripts" / "export_ensemble.py"), "--name", "bad", f"export.models_dir={tmp_path / 'models'}"]

    missing = tmp_path / "missing"
    shutil.copytree(cross_validation / "fold0", missing / "fold0")
    done = subprocess.run([*script, "--cross-validation", str(missing)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "not the 2 folds of one cross-validation" in done.stderr and "every fold trained" in done.stderr

    done = subprocess.run([*script, "--cross-validation", str(tmp_path / "nowhere")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "no fold models found" in done.stderr

    done = subprocess.run(
        [*script, "run-a", "--cross-validation", str(cross_validation)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 2 and "one of them, not both" in done.stderr
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
