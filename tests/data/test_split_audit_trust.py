"""What a leakage audit and the folds may be trusted with: the images its rows were loaded with (not a later build's),
a study shared by a held-out site and a training site (one patient in two splits, whatever override is set), and folds
cut alike and stratified whatever version of scikit-learn cuts them."""

from __future__ import annotations

import numpy as np
import pytest

from medtriage.data.audit import LeakageError, audit_manifest, require_clean
from medtriage.data.folds import cross_validation_fold
from medtriage.data.holdout import hold_out_site
from medtriage.data.manifest import PoolWriter, load_manifest
from medtriage.data.splits import assign_splits
from medtriage.errors import InputError


def _noise(n: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct random images: far apart in perceptual hash from each other."""
    rng = np.random.default_rng(seed)
    return [rng.random((1, 28, 28)).astype(np.float32) for _ in range(n)]


def _write(folder, rows, images) -> PoolWriter:
    """rows: dicts with site, patient_id, study_uid, label and split; one image each."""
    writer = PoolWriter(folder, ["normal", "pneumonia"])
    for row, image in zip(rows, images):
        uid = f"u{len(writer.rows)}"
        writer.add(image, series_uid=uid, sop_uid=uid, path=f"{row['site']}/{uid}.dcm", **row)
    return writer


# ---------------------------------------------------------------- the images the rows were loaded with


def _rows(n: int) -> list[dict]:
    return [
        {"site": "a", "patient_id": f"p{i}", "study_uid": f"1.2.3.{i}", "label": i % 2, "split": ("train", "val", "test")[i % 3]}
        for i in range(n)
    ]


def test_a_manifest_loaded_before_a_rebuild_is_not_audited_or_folded_on_the_new_pixels(tmp_path):
    images = _noise(12)
    _write(tmp_path, _rows(12), images).close()
    stale, mapped = load_manifest(tmp_path), load_manifest(tmp_path)
    mapped.image(0)  # its pixel file mapped before the rebuild: that file stays its own
    # the same rows and shapes, but the test image of row 2 is now a copy of row 0's (train) image
    _write(tmp_path, _rows(12), [images[0], images[1], images[0], *images[3:]]).close()
    for read in (audit_manifest, lambda m: cross_validation_fold(m, 2, 0)):
        with pytest.raises(InputError, match="changed since this manifest was read"):
            read(stale)
    assert audit_manifest(mapped).findings == []
    assert "same_image_in_two_splits" in {f.kind for f in audit_manifest(load_manifest(tmp_path)).findings}


# ---------------------------------------------------------------- a study at two sites, one held out


def test_no_override_lets_a_study_of_the_held_out_site_also_in_training_through(tmp_path):
    # one patient's study, sent on from site a to site b: the splits keep it in one split, holding b out moves only b's copy
    forwarded = "1.2.826.0.1.3680043.8.498.7"
    rows = [
        {"site": s, "patient_id": f"{s}{i}", "study_uid": f"1.2.3.{int(s == 'b')}.{i}", "label": i % 2} for s in "ab" for i in range(12)
    ]
    rows[0]["study_uid"] = rows[12]["study_uid"] = forwarded  # a0 at site a is b0 at site b
    for row, split in zip(rows, assign_splits(rows, seed=2)):
        row["split"] = split
    assert rows[0]["split"] in ("train", "val")  # so that holding b out puts the study in two splits
    images = _noise(len(rows))
    images[12] = images[0]
    held_out = hold_out_site(_write(tmp_path, rows, images).close(), "b")
    assert {f.kind for f in audit_manifest(held_out).findings} >= {"study_in_two_splits", "same_image_in_two_splits"}
    with pytest.raises(LeakageError, match="lets study_in_two_splits through"):
        require_clean(held_out, override=True)  # an override meant for known duplicate images


# ---------------------------------------------------------------- folds stratified, whatever scikit-learn cuts them


def test_folds_keep_the_class_balance_of_the_pool_on_every_seed(tmp_path):
    # scikit-learn before 1.8 shuffled the groups' class counts apart from the groups themselves: folds cut at random
    rows = [
        {"site": "a", "patient_id": f"p{i}", "study_uid": f"1.2.3.{i}", "label": int(i % 4 == 0), "split": ("train", "val")[i % 2]}
        for i in range(48)
        for _ in range(1 + i % 3)
    ]
    pool = _write(tmp_path, rows, _noise(len(rows))).close()
    for seed in range(5):
        held = [cross_validation_fold(pool, 3, fold, seed).rows.query("split == 'val'") for fold in range(3)]
        assert sorted(i for fold_rows in held for i in fold_rows.index) == list(range(len(rows)))
        assert [fold_rows["label"].mean() for fold_rows in held] == pytest.approx([0.25] * 3, abs=0.05), f"seed {seed}"
