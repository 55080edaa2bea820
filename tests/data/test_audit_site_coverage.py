"""What each site contributes to each split: a site with no negative images in a split, a site that never leaves one
split, and leave-one-site-out on a pool whose other sites keep no validation images. Pools of real PneumoniaMNIST
X-rays, cut by the project's own patient-level splits where the split matters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medtriage.cli import main as cli_main
from medtriage.data.audit import LeakageError, audit_manifest, require_clean
from medtriage.data.folds import all_labelled
from medtriage.data.holdout import hold_out_site
from medtriage.data.manifest import PoolWriter
from medtriage.data.splits import assign_splits
from medtriage.errors import DataNotFoundError
from tests.data.test_audit import _add, _pool, first_xrays


@pytest.fixture(scope="module")
def xrays():
    return first_xrays(45)


def _one_class_rows(xrays, site: str, label: int, splits=("train", "val")) -> list:
    """Extra rows for `_pool`: two patients of `site` per split, every image of class `label`."""
    images, labels = xrays
    chosen = np.flatnonzero(labels == label)[: 2 * len(splits)]
    return [(images[i], label, site, f"{site}-p{i}", splits[k // 2]) for k, i in enumerate(chosen)]


def _findings(manifest) -> dict:
    return {f.kind: f for f in audit_manifest(manifest, check_images=False).findings}  # the rows reuse the pool's X-rays


def _split_pool(folder: Path, xrays, patients_per_site: dict[str, int]) -> object:
    """One X-ray per patient, half of each site's patients normal, splits cut by `assign_splits` at its defaults."""
    images, labels = xrays
    by_class = {label: list(np.flatnonzero(labels == label)) for label in (0, 1)}
    rows = []
    for site, count in patients_per_site.items():
        for k in range(count):
            label = k % 2
            rows.append({"site": site, "patient_id": f"{site}-p{k}", "label": label, "image": images[by_class[label].pop()]})
    writer = PoolWriter(folder, ["normal", "pneumonia"])
    for row, split in zip(rows, assign_splits(rows)):
        _add(writer, row["image"], row["label"], row["site"], row["patient_id"], split)
    return writer.close()


# ---------------------------------------------------------------- a site with one class only in a split


def test_a_site_without_negative_images_in_a_split_is_reported_like_one_without_positives(tmp_path, xrays):
    extra = _one_class_rows(xrays, "site_c", 1) + _one_class_rows(xrays, "site_d", 0)
    pool = _pool(tmp_path / "pool", xrays, extra=extra)
    found = _findings(pool)
    negatives, positives = found["site_without_negatives"], found["site_without_positives"]
    assert negatives.examples == [{"split": "train", "site": "site_c"}, {"split": "val", "site": "site_c"}]
    assert positives.examples == [{"split": "train", "site": "site_d"}, {"split": "val", "site": "site_d"}]
    assert "specificity" in negatives.message and "site_c in val" in negatives.message
    # a missing negative class warns (small pneumonia sites often lack normal patients in val); a missing positive fails
    assert (negatives.severity, positives.severity) == ("warning", "error")
    with pytest.raises(LeakageError, match="site_without_positives"):
        require_clean(pool, check_images=False)


def test_medtriage_audit_prints_a_site_without_negatives(tmp_path, xrays, capsys):
    _pool(tmp_path / "pool", xrays, extra=_one_class_rows(xrays, "site_c", 1))
    assert cli_main(["audit", str(tmp_path / "pool"), "--no-images"]) == 0  # a warning does not fail the audit
    out = capsys.readouterr().out
    assert "PASSED" in out and "[warning] site_without_negatives: no negative images for site_c in train, site_c in val" in out


# ---------------------------------------------------------------- a site that never leaves one split


def test_a_site_of_one_patient_stays_in_train_and_is_reported(tmp_path, xrays):
    pool = _split_pool(tmp_path / "pool", xrays, {"site_a": 20, "site_b": 1})
    assert set(pool.rows.loc[pool.rows["site"] == "site_b", "split"]) == {"train"}  # as the splits cut it, not planted
    finding = _findings(pool)["site_in_one_split"]
    assert finding.severity == "warning" and finding.examples == [{"site": "site_b", "split": "train", "patients": 1}]
    assert "site_b only in train (1 patient(s))" in finding.message


def test_a_held_out_site_and_a_refit_are_not_reported_as_confined(tmp_path, xrays):
    pool = _split_pool(tmp_path / "pool", xrays, {"site_a": 20, "site_b": 20})
    assert "site_in_one_split" not in _findings(pool)
    assert "site_in_one_split" not in _findings(hold_out_site(pool, "site_b"))  # all test by design
    assert "site_in_one_split" not in _findings(all_labelled(pool))  # all train by design


# ---------------------------------------------------------------- leave-one-site-out without validation images


def test_holding_out_the_only_site_with_validation_patients_is_refused(tmp_path, xrays):
    pool = _split_pool(tmp_path / "pool", xrays, {"site_a": 20, "site_b": 4})  # site_b: 2 patients per class, all train
    assert set(pool.split("val")["site"]) == {"site_a"}
    with pytest.raises(DataNotFoundError, match="no validation images left once 'site_a' is held out") as err:
        hold_out_site(pool, "site_a")
    assert err.value.where == str(pool.pool_dir) and "val-fraction" in err.value.hint
    held = hold_out_site(pool, "site_b")  # the other way round, site_a keeps train and validation
    assert set(held.split("val")["site"]) == {"site_a"} and set(held.split("test")["site"]) == {"site_b"}


@pytest.mark.parametrize("pooling", [{"cv_folds": 2, "cv_fold": 0, "cv_seed": 0}, {"refit": True}], ids=["cv-fold", "refit"])
def test_a_fold_or_refit_of_a_site_held_out_needs_no_validation_split_of_its_own(tmp_path, xrays, monkeypatch, pooling):
    """A fold cuts its validation images from train + validation, a refit trains on both: the pool's own split is unused."""
    from types import SimpleNamespace

    from medtriage.data.sources import registry

    pool = _split_pool(tmp_path / "pool", xrays, {"site_a": 20, "site_b": 4})
    monkeypatch.setattr(registry, "build_pool", lambda data: pool)
    data = SimpleNamespace(**{"holdout_site": "site_a", "cv_folds": None, "refit": False, **pooling})
    run = registry.load_pool(data)
    assert "site_a" not in set(run.rows.loc[run.rows["split"] != "test", "site"])  # the held-out site never trains
    assert len(run.split("train")) > 0
    if not pooling.get("refit"):
        assert len(run.split("val")) > 0  # the fold's own validation images, cut from site_b's
