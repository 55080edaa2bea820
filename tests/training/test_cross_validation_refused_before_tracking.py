"""A cross-validation refused before any fold trained (a pool that cannot be built, folds that cannot be cut, a failed
leakage audit) opened its MLflow parent run first: the run stayed in the experiment, FAILED and without folds, naming
a run folder that the refusal then removed. Now everything that can refuse it runs before the parent run is created,
as a plain training run loads and checks its data before its MLflow run; once the parent exists, its folder stays."""

from __future__ import annotations

import os

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.cli.test_hydra_errors_one_line import one_line_error
from tests.training.test_refused_run_folders import _folders, _train
from tests.training.test_training_command_checks import few_normal_npz  # noqa: F401  (a fixture used below)

CV = "medtriage.cli.cross_validate"


def _runs() -> list[tuple[str, str]]:
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    return [(r.info.run_name, r.info.status) for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]


def _npz(path, *, label_in_train: int = 1, test_copied_to_train: bool = False):
    """An npz of 3 normal and 3 pneumonia patients per labelled split: `label_in_train` is the first train image's
    label, `test_copied_to_train` puts the first test image into train as well."""
    rng = np.random.default_rng(1)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.array([[0]] * 3 + [[1]] * 3, dtype=np.uint8)
    arrays["train_labels"][0] = label_in_train
    if test_copied_to_train:
        arrays["train_images"][0] = arrays["test_images"][0]
    np.savez(path, **arrays)
    return path


def _pool_with_a_site_without_positives(pool_dir):
    """A pool (no npz) whose small site has only normal images: every fold's audit fails site_without_positives."""
    from medtriage.data.manifest import PoolWriter

    rng = np.random.default_rng(2)
    writer = PoolWriter(pool_dir, ["normal", "pneumonia"])
    for site, patients in (("north", 18), ("south", 4)):
        for i in range(patients):
            writer.add(
                rng.random((1, 28, 28), dtype=np.float32),
                site=site,
                patient_id=f"{site}{i}",
                study_uid=f"s{site}{i}",
                series_uid=f"r{site}{i}",
                sop_uid=f"{site}.{i}",
                path=f"{site}/{i}.dcm",
                label=i % 2 if site == "north" else 0,
                split=("train", "val", "test")[i % 3] if site == "north" else ("train", "val")[i % 2],
            )
    writer.close()


def _refusal(case: str, tmp_path, few_normal) -> tuple[list[str], str]:
    """(overrides, what the one error line says) of each way a cross-validation is refused before its folds."""
    pool = f"data.pool_dir={tmp_path}/pool"
    if case == "pool cannot be built":
        npz = _npz(tmp_path / "label2.npz", label_in_train=2)
        return [f"data.npz_path={npz}", pool], "'train_labels' holds label 2"
    if case == "folds cannot be cut":
        return [f"data.npz_path={few_normal}", pool, "cv.folds=5"], "no validation images of the negative class"
    if case == "a test image in a fold":
        npz = _npz(tmp_path / "copied.npz", test_copied_to_train=True)
        return [f"data.npz_path={npz}", pool, "data.allow_audit_failure=false"], "in test and in train or validation"
    assert case == "a fold fails the leakage audit"
    _pool_with_a_site_without_positives(tmp_path / "pool")
    return ["data.npz_path=null", pool, "data.allow_audit_failure=false", "cv.folds=2"], "site_without_positives"


@pytest.mark.parametrize(
    "case", ["pool cannot be built", "folds cannot be cut", "a test image in a fold", "a fold fails the leakage audit"]
)
def test_a_cross_validation_refused_before_its_folds_leaves_no_mlflow_run(case, tmp_path, monkeypatch, capsys, few_normal_npz):  # noqa: F811
    from medtriage.workflows import cross_validation

    def no_fold_may_train(*args, **kwargs):
        raise AssertionError("a fold was started")

    monkeypatch.setattr(cross_validation, "_run_folds", no_fold_may_train)
    overrides, says = _refusal(case, tmp_path, few_normal_npz)
    one_line_error(_train(tmp_path, monkeypatch, *overrides, module=CV), capsys, says)
    assert _runs() == [], "the refused cross-validation left an MLflow run"
    assert _folders(tmp_path) == []


def test_a_cross_validation_that_failed_once_tracked_keeps_its_run_and_its_folder(tmp_path, monkeypatch, capsys):
    from medtriage.workflows import cross_validation

    def a_fold_fails(overrides, folds, out_dir, *args):
        raise cross_validation.FoldFailedError("fold 0 failed (exit 1)", where=str(out_dir / "fold0" / "train.log"))

    monkeypatch.setattr(cross_validation, "_run_folds", a_fold_fails)
    npz = _npz(tmp_path / "fine.npz")
    one_line_error(
        _train(tmp_path, monkeypatch, f"data.npz_path={npz}", f"data.pool_dir={tmp_path}/pool", module=CV), capsys, "fold 0 failed"
    )
    ((name, status),) = _runs()
    assert name.endswith("-cv3") and status == "FAILED"
    (folder,) = _folders(tmp_path)  # the folder its MLflow run names
    assert (folder / ".hydra" / "config.yaml").is_file()
