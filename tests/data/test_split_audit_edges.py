"""Edges of the splits, folds and leakage audit: one patient under two spellings of its padded ID, damaged pixels,
pools too small for the folds asked for, test images also labelled, blank images, and images handed to the hash as a
stream."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from medtriage.data.audit import LeakageError, audit_manifest, perceptual_hashes, require_clean
from medtriage.data.folds import all_labelled, cross_validation_fold, inseparable_groups
from medtriage.data.manifest import PoolWriter
from medtriage.data.sources.medmnist import as_chw
from medtriage.data.splits import assign_splits
from medtriage.errors import ConfigError, DataNotFoundError, InputError
from tests.data.test_audit import first_xrays


@pytest.fixture(scope="module")
def xrays():
    return first_xrays(6)


def _pool(folder: Path, rows) -> object:
    """rows: (image [C, H, W] or [H, W] uint8, label, patient, split), all at site `a`."""
    writer = PoolWriter(folder, ["normal", "pneumonia"])
    for image, label, patient, split in rows:
        uid = f"u{len(writer.rows)}"
        pixels = as_chw(image) if image.ndim == 2 else image
        writer.add(pixels, site="a", patient_id=patient, study_uid=uid, series_uid=uid, sop_uid=uid, path=uid, label=label, split=split)
    return writer.close()


def _noise(n: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct random images: far apart in perceptual hash from each other and from any X-ray."""
    rng = np.random.default_rng(seed)
    return [rng.random((1, 28, 28)).astype(np.float32) for _ in range(n)]


def _clean_rows(xrays) -> list:
    images, labels = xrays
    return [(images[i], int(labels[i]), f"p{i}", ("train", "val", "test")[i % 3]) for i in range(len(images))]


# ---------------------------------------------------------------- one patient, its ID padded at one site and not at another


def test_folds_refuse_a_test_patient_whose_id_differs_only_in_padding(tmp_path, xrays):
    # the audit and the splits take ' p2' and 'p2' for one patient; the folds must too, or its test image leaks
    images, labels = xrays
    pool = _pool(tmp_path / "pool", [*_clean_rows(xrays), (images[7], int(labels[7]), " p2 ", "train")])  # p2 is in test
    assert "patient_in_two_splits" in {f.kind for f in audit_manifest(pool, check_images=False).findings}
    with pytest.raises(Exception, match="a/p2") as err:
        cross_validation_fold(pool, 2, 0)
    assert "test and in train or validation" in str(err.value)
    with pytest.raises(Exception, match="test and in train or validation"):
        all_labelled(pool)


def test_folds_keep_a_patient_together_whatever_the_padding_of_its_id(tmp_path, xrays):
    other = _noise(1)[0]  # an image like no other in the pool: only the patient can tie the two rows
    pool = _pool(tmp_path / "pool", [*_clean_rows(xrays), (other, 1, "  p1", "train")])  # p1 is in val
    groups = inseparable_groups(pool)
    assert groups[1] == groups[len(pool.rows) - 1]
    assert len(set(groups)) == len(pool.rows) - 1


# ---------------------------------------------------------------- one patient, its ID written two ways at one site


def _pool_of_studies(folder: Path, rows) -> object:
    """rows: (patient, study UID, split, label), each a distinct image at site `a`."""
    writer = PoolWriter(folder, ["normal", "pneumonia"])
    for image, (patient, study, split, label) in zip(_noise(len(rows)), rows):
        uid = f"u{len(writer.rows)}"
        writer.add(image, site="a", patient_id=patient, study_uid=study, series_uid=uid, sop_uid=uid, path=uid, label=label, split=split)
    return writer.close()


SHARED_STUDY = "1.2.826.0.1.3680043.8.498.1"
PATIENTS_OF_TWO_STUDIES = [
    ("AB12", SHARED_STUDY, "train", 1),  # a frontal view
    ("ab12", SHARED_STUDY, "test", 1),  # its lateral view, the ID typed again in lower case
    *[(f"p{i}", f"1.2.3.{i}", ("train", "val", "test")[i % 3], i % 2) for i in range(9)],
]


def test_the_audit_finds_one_study_under_two_patient_ids_in_two_splits(tmp_path):
    result = audit_manifest(_pool_of_studies(tmp_path / "pool", PATIENTS_OF_TWO_STUDIES), check_images=False)
    leaked = [f for f in result.findings if f.kind == "study_in_two_splits"]
    assert not result.ok and leaked and leaked[0].severity == "error"
    assert leaked[0].examples == [{"study_uid": SHARED_STUDY, "splits": ["test", "train"], "patients": ["a/AB12", "a/ab12"]}]


def test_a_study_of_one_patient_or_a_study_named_by_its_pool_is_not_reported_twice(tmp_path):
    rows = [
        ("AB12", SHARED_STUDY, "train", 1),
        ("AB12", SHARED_STUDY, "test", 1),
        ("p1", "slide-1", "train", 0),
        ("p2", "slide-1", "test", 0),
    ]
    kinds = {f.kind for f in audit_manifest(_pool_of_studies(tmp_path / "pool", rows), check_images=False).findings}
    assert "patient_in_two_splits" in kinds and "study_in_two_splits" not in kinds  # tile pools name studies per file stem


def test_folds_refuse_a_test_study_also_labelled_under_another_patient_id(tmp_path):
    """A cross-validation's audit never sees test: the folds themselves refuse a study in test and in train."""
    pool = _pool_of_studies(tmp_path / "pool", PATIENTS_OF_TWO_STUDIES)
    for cut in (lambda: cross_validation_fold(pool, 2, 0), lambda: all_labelled(pool)):
        with pytest.raises(
            LeakageError, match=f"1 DICOM study\\(ies\\) with images in test and in train or validation, e.g. {SHARED_STUDY}"
        ):
            cut()


def test_folds_keep_one_study_together_whatever_its_patient_ids(tmp_path):
    pool = _pool_of_studies(tmp_path / "pool", [(patient, study, "train", label) for patient, study, _, label in PATIENTS_OF_TWO_STUDIES])
    groups = inseparable_groups(pool)
    assert groups[0] == groups[1] and len(set(groups)) == len(pool.rows) - 1


# ---------------------------------------------------------------- damaged pixels


def test_nan_pixels_are_refused_by_name_not_taken_for_duplicates(tmp_path):
    # two different images, each with one NaN pixel, hashed alike: a false duplicate in the audit, one group in the folds
    images = _noise(4)
    images[0][0, 3, 3] = np.nan
    images[1][0, 20, 9] = np.inf
    pool = _pool(tmp_path / "pool", [(images[i], i % 2, f"p{i}", ("train", "val")[i // 2]) for i in range(4)])
    for check in (audit_manifest, inseparable_groups):
        with pytest.raises(InputError, match="NaN or infinite") as err:
            check(pool)
        assert "u0" in str(err.value) and "2 image(s)" in str(err.value) and "build it again" in str(err.value)


# ---------------------------------------------------------------- duplicate images of test, blank images


def test_folds_and_a_refit_refuse_a_test_image_also_labelled_unless_duplicates_are_allowed(tmp_path, xrays, capsys):
    """A cross-validation's audit never sees test: the folds themselves refuse a test image that is also labelled
    (the official PneumoniaMNIST splits share such copies), with the override the audit of a plain run takes."""
    images, labels = xrays
    pool = _pool(tmp_path / "pool", [*_clean_rows(xrays), (images[2], int(labels[2]), "copy", "train")])  # row 2: test
    with pytest.raises(LeakageError, match="allow_audit_failure=true"):
        require_clean(pool)
    for cut in (lambda **kw: cross_validation_fold(pool, 2, 0, **kw), lambda **kw: all_labelled(pool, **kw)):
        with pytest.raises(LeakageError, match="data.allow_audit_failure=true") as err:
            cut()
        assert "1 pair(s) of identical or near-identical images in test and in train or validation, e.g. u2 and u12" in str(err.value)
        assert "test" not in set(cut(allow_duplicates=True).rows["split"])
        assert "let through by data.allow_audit_failure" in capsys.readouterr().out


@pytest.mark.parametrize("pooling", [{"cv_folds": 2, "cv_fold": 0, "cv_seed": 0, "refit": False}, {"cv_folds": None, "refit": True}])
def test_a_runs_data_allow_audit_failure_lets_known_test_duplicates_into_its_folds(tmp_path, xrays, monkeypatch, pooling):
    from medtriage.data.sources import registry

    images, labels = xrays
    pool = _pool(tmp_path / "pool", [*_clean_rows(xrays), (images[2], int(labels[2]), "copy", "train")])  # row 2: test
    monkeypatch.setattr(registry, "build_pool", lambda data: pool)
    with pytest.raises(LeakageError, match="data.allow_audit_failure=true"):
        registry.load_pool(SimpleNamespace(holdout_site=None, allow_audit_failure=False, **pooling))
    run = registry.load_pool(SimpleNamespace(holdout_site=None, allow_audit_failure=True, **pooling))
    assert "test" not in set(run.rows["split"]) and len(run.rows) == (pool.rows["split"] != "test").sum()


def test_blank_images_are_no_duplicates_of_one_another(tmp_path, xrays):
    """Every constant image hashes alike, whatever its value: taken for duplicates, they would all form one group."""
    blanks = [np.full((28, 28), value, np.uint8) for value in (0, 0, 1, 128, 255, 0)]
    splits = ("train", "val", "train", "val", "train", "test")
    pool = _pool(tmp_path / "pool", [*_clean_rows(xrays), *[(b, i % 2, f"b{i}", s) for i, (b, s) in enumerate(zip(blanks, splits))]])
    groups = inseparable_groups(pool)
    assert len(set(groups)) == len(pool.rows)
    (finding,) = audit_manifest(pool).findings  # no duplicate finding; the blanks themselves are named
    assert (finding.kind, finding.severity, finding.count) == ("constant_image", "warning", len(blanks))
    assert [example["split"] for example in finding.examples] == list(splits)
    assert "test" not in set(cross_validation_fold(pool, 2, 0).rows["split"])  # a blank test image is no one's copy


# ---------------------------------------------------------------- pools too small for the folds


def test_cross_validation_or_a_refit_of_a_pool_without_labelled_images_says_so(tmp_path, xrays):
    images, labels = xrays
    only_test = _pool(tmp_path / "only_test", [(images[0], int(labels[0]), "p0", "test")])
    with pytest.raises(DataNotFoundError, match="no train or validation images"):
        cross_validation_fold(only_test, 3, 0)
    with pytest.raises(DataNotFoundError, match="no train or validation images"):
        cross_validation_fold(_pool(tmp_path / "empty", []), 3, 0)
    with pytest.raises(DataNotFoundError, match="no train or validation images to refit on"):
        all_labelled(only_test)  # before, a refit "on all 0 labelled images"


def test_more_folds_than_patients_is_a_config_error_naming_the_limit(tmp_path, xrays):
    images, labels = xrays
    rows = [(images[i], int(labels[i]), f"p{i // 3}", "train") for i in range(12)]  # 4 patients, 12 images
    pool = _pool(tmp_path / "pool", rows)
    with pytest.raises(ConfigError, match="4 group") as err:
        cross_validation_fold(pool, 5, 0)
    assert err.value.where == "data.cv_folds" and "at most 4" in str(err.value)


def test_a_fold_left_empty_by_the_stratification_is_refused(tmp_path, xrays):
    # 5 patients in 5 folds: the stratified grouping puts two patients in one fold and leaves another empty
    sizes, patient_labels = [2, 5, 2, 3, 2], [1, 0, 0, 0, 1]
    rows = [(image, y, f"p{p}", "train") for p, (n, y) in enumerate(zip(sizes, patient_labels)) for image in _noise(n, seed=p)]
    pool = _pool(tmp_path / "pool", rows)
    outcomes = []
    for fold in range(5):
        try:
            outcomes.append(int((cross_validation_fold(pool, 5, fold).rows["split"] == "val").sum()))
        except ConfigError as err:
            assert err.where == "data.cv_folds" and "no validation images" in str(err)
            outcomes.append("refused")
    assert "refused" in outcomes and 0 not in outcomes


def test_a_class_too_small_for_any_fold_is_a_config_error(tmp_path, xrays):
    # 8 patients are enough groups for 5 folds, but 4 of each class cannot give every fold one of either
    images, labels = xrays
    pool = _pool(tmp_path / "pool", [(images[i], int(labels[i]), f"p{i}", "train") for i in [0, 1, 2, 3, 6, 7, 8, 9]])
    with pytest.raises(ConfigError, match="number of members in each class") as err:
        cross_validation_fold(pool, 5, 0)
    assert err.value.where == "data.cv_folds" and "fewer folds" in str(err.value)


@pytest.mark.parametrize(("fold", "side"), [(0, "training"), (1, "validation"), (2, "validation")])
def test_a_fold_without_one_class_on_either_side_is_refused(tmp_path, fold, side):
    # enough images of each class for 3 folds, but every negative image is one patient's: stratifying by image cannot
    # spread them, so one fold validates on them all (and trains on positives alone) and the others validate without any
    rows = [(image, 0, "p0", "train") for image in _noise(6, seed=0)]
    rows += [(image, 1, f"p{i + 1}", "train") for i, image in enumerate(_noise(5, seed=1))]
    pool = _pool(tmp_path / "pool", rows)
    with pytest.raises(ConfigError, match=f"fold {fold} of 3 has no {side} images of the negative class") as err:
        cross_validation_fold(pool, 3, fold)
    assert err.value.where == "data.cv_folds" and "fewer folds" in err.value.hint


# ---------------------------------------------------------------- the hash takes what `Manifest.images` gives


def test_perceptual_hashes_take_a_stream_or_an_array_of_images(tmp_path, xrays):
    pool = _pool(tmp_path / "pool", _clean_rows(xrays))
    listed = perceptual_hashes([pool.image(i) for i in range(len(pool.rows))])
    assert (perceptual_hashes(pool.images(range(len(pool.rows)))) == listed).all()
    assert (perceptual_hashes(np.stack([pool.image(i) for i in range(len(pool.rows))])) == listed).all()
    assert perceptual_hashes(pool.images([])).shape == (0, listed.shape[1])


# ---------------------------------------------------------------- seeds


def test_a_negative_split_seed_is_a_config_error():
    rows = [{"site": "a", "patient_id": f"p{i}", "label": i % 2} for i in range(10)]
    with pytest.raises(ConfigError, match="seed -1") as err:
        assign_splits(rows, 0.15, 0.2, seed=-1)
    assert "pool_seed" in err.value.where and err.value.hint


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_cross_validation_seed_out_of_range_names_the_setting(tmp_path, xrays, seed):
    pool = _pool(tmp_path / "pool", _clean_rows(xrays))
    with pytest.raises(ConfigError, match="seed") as err:
        cross_validation_fold(pool, 2, 0, seed)
    assert err.value.where == "data.cv_seed"
