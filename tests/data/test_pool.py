"""Pool builder: site folders -> manifest + rejects, counts in = rows + rejects, cached, patient-level splits."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from medtriage.data import pool as pool_module
from medtriage.data.pool import build_sites_pool, split_files
from medtriage.data.simulate.sites import make_sites
from medtriage.errors import DataNotFoundError
from medtriage.io.dicom import read_dicom

ROOT = Path(__file__).resolve().parents[2]
NPZ = ROOT / "data" / "samples" / "pneumoniamnist_28.npz"


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    out = tmp_path_factory.mktemp("sites")
    return out, make_sites(NPZ, out, seed=5, limit=48)


@pytest.fixture(scope="module")
def built(sites, tmp_path_factory):
    out, results = sites
    pool_dir = tmp_path_factory.mktemp("pool")
    return build_sites_pool(out, pool_dir, seed=0, workers=1, verbose=False)


def count_files(folder: Path) -> int:
    """Image files of the site folders (not their labels.csv, nor the sites' secrets in .keys/)."""
    return sum(1 for p in folder.rglob("*") if p.is_file() and p.name != "labels.csv" and ".keys" not in p.relative_to(folder).parts)


def test_counts_in_equal_rows_plus_rejects(sites, built):
    out, results = sites
    orphan_rows = sum(r.planted["unknown_id"] for r in results)
    assert count_files(out) + orphan_rows == len(built.rows) + len(built.rejects)
    # every planted defect is rejected, and nothing else is
    planted = sum(sum(r.planted.values()) for r in results)
    assert len(built.rejects) == planted
    unusable_labels = sum(r.planted.get(k, 0) for r in results for k in ("empty_finding", "no_label_row", "unknown_finding"))
    assert len(built.rows) == sum(r.images for r in results) - unusable_labels


@pytest.mark.parametrize(
    "kind, count",
    [
        ("label row matches no image", 6),
        ("empty finding in labels.csv", 3),
        ("no label row in labels.csv", 1),
        ("unknown finding in labels.csv", 1),
        ("truncated pixel data", 1),
        ("DICOM object without pixel data", 1),
    ],
)
def test_each_reject_kind_is_recorded_with_its_reason(built, kind, count):
    assert built.rejects["reason"].str.startswith(kind).sum() == count


def test_rows_point_at_their_files_and_cache_their_pixels(sites, built):
    out, _ = sites
    assert set(built.rows["site"]) == {"st_marys", "northgate", "riverside"}
    assert set(built.rows["label"]) <= {0, 1}
    assert not built.rows[["patient_id", "study_uid", "series_uid", "sop_uid"]].isna().any().any()
    for index in (0, len(built.rows) // 2, len(built.rows) - 1):
        row = built.rows.iloc[index]
        decoded = read_dicom(out / row["path"])
        np.testing.assert_array_equal(built.image(index), decoded.pixels[0])
        assert decoded.sop_uid == row["sop_uid"]


def test_no_patient_in_two_splits(built):
    splits_per_patient = built.rows.groupby(["site", "patient_id"])["split"].nunique()
    assert (splits_per_patient == 1).all()
    assert set(built.rows["split"]) <= {"train", "val", "test"}


def test_rebuild_from_same_inputs_is_reused_and_a_change_rebuilds(sites, tmp_path, monkeypatch):
    out, _ = sites
    first = build_sites_pool(out, tmp_path, workers=1, verbose=False)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although nothing changed")

    monkeypatch.setattr(pool_module, "_decode_all", no_decoding)
    assert build_sites_pool(out, tmp_path, workers=1, verbose=False).fingerprint == first.fingerprint
    with pytest.raises(AssertionError, match="decoded again"):
        build_sites_pool(out, tmp_path, seed=1, workers=1, verbose=False)  # other splits: not the same pool


def test_worker_processes_give_the_same_pool(sites, built, tmp_path, monkeypatch):
    out, _ = sites
    monkeypatch.setattr(pool_module, "IN_PROCESS_BELOW", 0)
    parallel = build_sites_pool(out, tmp_path, seed=0, workers=2, verbose=False)
    assert parallel.fingerprint == built.fingerprint


def test_bad_site_folders_are_rejected_and_the_run_goes_on(sites, tmp_path):
    out, _ = sites
    copy = tmp_path / "sites"
    shutil.copytree(out, copy)
    (copy / "riverside" / "labels.csv").unlink()
    (copy / "st_marys" / "notes.txt").write_text("not an image")
    manifest = build_sites_pool(copy, tmp_path / "pool", workers=1, verbose=False)
    reasons = manifest.rejects.set_index("path")["reason"]
    assert reasons["st_marys/notes.txt"].startswith("not a DICOM file")
    riverside_files = count_files(copy / "riverside")
    assert manifest.rejects["reason"].str.startswith("site has no labels.csv").sum() == riverside_files
    assert "riverside" not in set(manifest.rows["site"]) and len(manifest.rows) > 0


def test_missing_sites_folder_says_which_command_creates_it(tmp_path):
    with pytest.raises(DataNotFoundError, match="make_sites"):
        build_sites_pool(tmp_path / "nowhere", tmp_path / "pool", verbose=False)


def test_summary_lists_sites_and_reject_kinds(built):
    text = built.summary()
    assert "northgate" in text and "truncated pixel data" in text


def test_picked_files_show_each_label_at_each_site(sites, built):
    out, _ = sites
    rows = built.rows.set_index("path")
    picked = [rows.loc[str(path.relative_to(out))] for path in split_files(built.pool_dir, "test", per_label=1)]
    test = built.split("test")
    assert all(row["split"] == "test" for row in picked)
    assert sorted((row["site"], row["label"]) for row in picked) == sorted(set(zip(test["site"], test["label"])))
