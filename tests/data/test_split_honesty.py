"""What keeps the reported figures honest: patients stay in one split or fold, duplicates are found across them, and
no override or fold run lets a patient shared with test through."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtriage.data.audit import LeakageError, audit_manifest, require_clean
from medtriage.data.folds import all_labelled, cross_validation_fold
from medtriage.data.manifest import PoolWriter
from medtriage.data.sources.medmnist import as_chw
from medtriage.data.splits import assign_splits
from tests.data.test_audit import first_xrays


@pytest.fixture(scope="module")
def xrays():
    return first_xrays(30)


def _pool(folder: Path, xrays, extra=()):
    """One site, one patient per X-ray, the splits in turn; `extra` rows are (image, label, patient, split)."""
    images, labels = xrays
    writer = PoolWriter(folder, ["normal", "pneumonia"])
    rows = [(images[i], int(labels[i]), f"p{i}", ("train", "val", "test")[i % 3]) for i in range(len(images))]
    for image, label, patient, split in [*rows, *extra]:
        uid = f"u{len(writer.rows)}"
        writer.add(
            as_chw(image), site="a", patient_id=patient, study_uid=uid, series_uid=uid, sop_uid=uid, path=uid, label=label, split=split
        )
    return writer.close()


def _jpeg(image: np.ndarray, quality: int = 60) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer))


def _rescaled(image: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


# ---------------------------------------------------------------- splits


def _rows(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {"site": str(rng.choice(["a", "b"])), "patient_id": f"P{rng.integers(0, 80)}", "label": int(rng.random() < 0.5)} for _ in range(500)
    ]


def test_splits_do_not_depend_on_row_order():
    rows = _rows()
    splits = assign_splits(rows, 0.15, 0.2, seed=3)
    order = np.random.default_rng(1).permutation(len(rows))
    shuffled = assign_splits([rows[i] for i in order], 0.15, 0.2, seed=3)
    assert [shuffled[k] for k in np.argsort(order)] == splits


def test_rows_without_a_patient_id_travel_together_per_site():
    # no id is one unknown patient per site: never split across train and test, whatever else it costs
    rows = [{"site": "a", "patient_id": "", "label": i % 2} for i in range(20)] + _rows()
    splits = assign_splits(rows, 0.15, 0.2, seed=0)
    assert len(set(splits[:20])) == 1
    patients = defaultdict(set)
    for row, split in zip(rows, splits):
        patients[(row["site"], row["patient_id"])].add(split)
    assert all(len(s) == 1 for s in patients.values())


# ---------------------------------------------------------------- audit and its override


def test_re_encoded_and_rescaled_copies_in_another_split_are_found_distinct_images_are_not(tmp_path, xrays):
    images, labels = xrays
    assert audit_manifest(_pool(tmp_path / "clean", xrays)).findings == []
    extra = [(_jpeg(images[0]), int(labels[0]), "copy1", "test"), (_rescaled(images[3], 64), int(labels[3]), "copy2", "val")]
    result = audit_manifest(_pool(tmp_path / "leaky", xrays, extra))
    near = next(f for f in result.findings if f.kind == "near_duplicate_in_two_splits")
    assert near.count == 2 and not result.ok
    assert {tuple(sorted(e["patients"])) for e in near.examples} == {("copy1", "p0"), ("copy2", "p3")}


def test_an_override_still_lets_known_duplicate_images_through(tmp_path, xrays):
    images, labels = xrays
    pool = _pool(tmp_path / "pool", xrays, [(images[0], int(labels[0]), "other", "val")])  # row 0 is in train
    with pytest.raises(LeakageError, match="allow_audit_failure=true"):
        require_clean(pool)
    result = require_clean(pool, override=True)
    assert not result.ok and {f.kind for f in result.findings} == {"same_image_in_two_splits"}


def test_an_override_does_not_let_a_patient_in_two_splits_through(tmp_path, xrays):
    images, labels = xrays
    pool = _pool(tmp_path / "pool", xrays, [(images[0], int(labels[0]), "p1", "train")])  # p1 is in val
    with pytest.raises(LeakageError, match="lets patient_in_two_splits through"):
        require_clean(pool, override=True)


# ---------------------------------------------------------------- folds


def test_folds_keep_re_encoded_copies_and_patients_together_and_leave_test_out(tmp_path, xrays):
    images, labels = xrays
    extra = [(_jpeg(images[0]), int(labels[0]), "q", "val"), (images[4], int(labels[4]), "q", "val")]  # chains rows 0 and 4
    pool = _pool(tmp_path / "pool", xrays, extra)
    test = set(pool.rows.index[pool.rows["split"] == "test"])
    together = [0, 4, len(pool.rows) - 2, len(pool.rows) - 1]
    for seed in (0, 1):
        for fold in range(3):
            folded = cross_validation_fold(pool, 3, fold, seed)
            assert not test & set(folded.rows.index)
            assert folded.rows.loc[together, "split"].nunique() == 1
            assert audit_manifest(folded).ok


def test_folds_and_refit_refuse_a_patient_shared_with_test(tmp_path, xrays):
    # the run's own audit never sees test, so the test patient's training images would go unnoticed
    images, labels = xrays
    pool = _pool(tmp_path / "pool", xrays, [(images[7], int(labels[7]), "p2", "train")])  # p2 is in test
    with pytest.raises(LeakageError, match="a/p2"):
        cross_validation_fold(pool, 3, 0)
    with pytest.raises(LeakageError, match="test and in train or validation"):
        all_labelled(pool)
