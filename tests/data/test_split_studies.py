"""Splits are cut by patient, and a DICOM study is one patient whatever Patient IDs its images carry (a
de-identification that gave each image its own pseudonym, an ID written two ways): its images never straddle splits."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from medtriage.data.audit import audit_manifest
from medtriage.data.pool import build_sites_pool
from medtriage.data.splits import assign_splits
from tests.data.test_pool_and_manifest_edges import write_dicom


def study_rows(studies: int = 40) -> list[dict]:
    """Two images per study, each under a Patient ID of its own."""
    return [
        {"site": "a", "patient_id": f"p{i}-{image}", "study_uid": f"1.2.826.0.1.{i}", "label": i % 2}
        for i in range(studies)
        for image in range(2)
    ]


def splits_of(rows: list[dict], splits: list[str], key: str) -> dict[str, set]:
    seen = defaultdict(set)
    for row, split in zip(rows, splits):
        seen[row[key]].add(split)
    return seen


def test_images_of_one_study_under_several_patient_ids_stay_in_one_split():
    rows = study_rows()
    splits = assign_splits(rows, 0.15, 0.2, seed=0)
    assert all(len(s) == 1 for s in splits_of(rows, splits, "study_uid").values())
    assert set(splits) == {"train", "val", "test"}  # still cut: a study is a unit, not the whole site


def test_a_study_joins_the_other_studies_of_its_patients():
    """Patient p1 has studies S and T; an image of T is under p2: p1, p2 and both studies are one unit."""
    rows = [
        {"site": "a", "patient_id": "p1", "study_uid": "1.2.3.1", "label": 0},
        {"site": "a", "patient_id": "p1", "study_uid": "1.2.3.2", "label": 0},
        {"site": "a", "patient_id": "p2", "study_uid": "1.2.3.2", "label": 1},
        {"site": "a", "patient_id": "p2", "study_uid": "1.2.3.3", "label": 1},
    ] + [{"site": "a", "patient_id": f"q{i}", "study_uid": f"1.2.4.{i}", "label": i % 2} for i in range(60)]
    for seed in range(5):
        assert len(set(assign_splits(rows, 0.15, 0.2, seed=seed)[:4])) == 1


def test_study_units_do_not_depend_on_row_order():
    rows = study_rows()
    splits = assign_splits(rows, 0.15, 0.2, seed=3)
    order = np.random.default_rng(1).permutation(len(rows))
    shuffled = assign_splits([rows[i] for i in order], 0.15, 0.2, seed=3)
    assert [shuffled[k] for k in np.argsort(order)] == splits


def test_names_that_are_not_dicom_uids_join_nothing():
    """An npz or tile pool names its studies itself ('train-00001', a slide id): only a DICOM UID is unique."""
    rows = [{"site": "a", "patient_id": f"p{i}", "study_uid": "", "label": i % 2} for i in range(40)]
    rows += [{"site": "a", "patient_id": f"r{i}", "study_uid": "slide", "label": i % 2} for i in range(40)]
    without = [{k: v for k, v in row.items() if k != "study_uid"} for row in rows]
    assert assign_splits(rows, 0.15, 0.2, seed=0) == assign_splits(without, 0.15, 0.2, seed=0)


def test_a_site_pool_keeps_a_study_whose_images_carry_two_patient_ids_in_one_split(tmp_path):
    sites, labels = tmp_path / "sites", ["accession_number,finding"]
    for i in range(24):
        study = f"1.2.826.0.1.3680043.{i + 1}"
        for image in range(2):
            write_dicom(sites / "a" / f"{i}-{image}.dcm", f"anon-{i}-{image}", f"A{i}-{image}", study_uid=study)
            labels.append(f"A{i}-{image},{('normal', 'pneumonia')[i % 2]}")
    (sites / "a" / "labels.csv").write_text("\n".join(labels) + "\n")
    manifest = build_sites_pool(sites, tmp_path / "pool", workers=1, verbose=False)
    assert len(manifest.rows) == 48 and manifest.rows.groupby("study_uid")["split"].nunique().max() == 1
    assert "study_in_two_splits" not in {f.kind for f in audit_manifest(manifest, check_images=False).findings}
