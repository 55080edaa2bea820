"""Cross-validation folds of train + validation: a partition, stratified, test left out, leaks kept together."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medtriage.data.audit import audit_manifest
from medtriage.data.folds import all_labelled, cross_validation_fold
from medtriage.data.manifest import PoolWriter
from medtriage.data.sources.medmnist import as_chw, read_npz
from medtriage.errors import ConfigError

NPZ = Path(__file__).resolve().parents[2] / "data/samples/pneumoniamnist_28.npz"


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """60 real X-rays in train/val/test, plus planted leaks: one X-ray in train and val, one patient in both."""
    images, labels = read_npz(NPZ)["train"]
    chosen = np.concatenate([np.flatnonzero(labels == 0)[:30], np.flatnonzero(labels == 1)[:30]])
    writer = PoolWriter(tmp_path_factory.mktemp("folds") / "pool", ["normal", "pneumonia"])

    def add(image, label, patient, split):
        uid = f"u{len(writer.rows)}"
        writer.add(
            as_chw(image), site="a", patient_id=patient, study_uid=uid, series_uid=uid, sop_uid=uid, path=uid, label=label, split=split
        )

    for rank, i in enumerate(chosen):
        add(images[i], int(labels[i]), f"p{rank}", ("train", "val", "test")[rank % 3])
    add(images[chosen[0]], int(labels[chosen[0]]), "copy", "val")  # byte-identical to row 0 (train)
    spare = np.flatnonzero(labels == 0)[30]  # an X-ray of no other row (a test row's would be a leak of test)
    add(images[spare], int(labels[spare]), "p0", "val")  # patient p0 again
    return writer.close()


def test_folds_partition_train_and_val_and_leave_test_out(pool):
    pooled = pool.rows[pool.rows["split"] != "test"]
    held = []
    for fold in range(3):
        rows = cross_validation_fold(pool, 3, fold).rows
        assert "test" not in set(rows["split"])
        assert sorted(rows.index) == sorted(pooled.index)
        held += list(rows.index[rows["split"] == "val"])
        positives = rows.loc[rows["split"] == "val", "label"].mean()
        assert 0.3 < positives < 0.7  # stratified: about the pool's 50%
    assert sorted(held) == sorted(pooled.index)  # every image is held out exactly once


def test_duplicates_and_patients_stay_in_one_fold(pool):
    assert not audit_manifest(pool).ok  # the planted leaks are real leaks in the official splits
    copy, second_visit = pool.rows.index[-2], pool.rows.index[-1]
    for fold in range(3):
        folded = cross_validation_fold(pool, 3, fold)
        split = folded.rows["split"]
        assert split[copy] == split[pool.rows.index[0]]
        assert split[second_visit] == split[pool.rows.index[0]]  # both rows of patient p0
        assert audit_manifest(folded).ok, audit_manifest(folded).summary()


def test_fold_fingerprints_differ_and_bad_folds_are_refused(pool):
    prints = {cross_validation_fold(pool, 3, f).fingerprint for f in range(3)}
    assert len(prints) == 3 and pool.fingerprint not in prints
    with pytest.raises(ConfigError, match="data.cv_fold"):
        cross_validation_fold(pool, 3, 3)
    with pytest.raises(ConfigError, match="at least 2 folds"):
        cross_validation_fold(pool, 1, 0)


def test_a_refit_pools_train_and_validation_as_train_and_leaves_test_out(pool):
    refit = all_labelled(pool)
    labelled = pool.rows[pool.rows["split"] != "test"]
    assert sorted(refit.rows.index) == sorted(labelled.index) and set(refit.rows["split"]) == {"train"}
    assert refit.fingerprint not in {pool.fingerprint, cross_validation_fold(pool, 3, 0).fingerprint}  # its own cache key
