"""Edges of the pool: blank identifiers (an accession number, a SOP Instance UID) and unreadable labels.csv files at
the sites, a reused pool's moved site folders, and a damaged or hand-edited pool folder read back (refused with the row
at fault, never trusted as a path or as training data)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medtriage.data.manifest import LABELS_FILE, MANIFEST_FILE, PIXELS_FILE, PoolWriter, load_manifest
from medtriage.data.pool import INPUTS_FILE, build_sites_pool, split_files
from medtriage.errors import DataNotFoundError, InputError

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def write_dicom(path: Path, patient_id: str, accession: str, study_uid: str | None = None) -> None:
    """A minimal 8x8 CR image with the identifiers the pool joins on."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CR_STORAGE, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.PatientID, ds.AccessionNumber, ds.Modality = patient_id, accession, "CR"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (np.arange(64, dtype=np.uint16) * 50).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CR_STORAGE, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def reason_of(manifest, path: str) -> str:
    return manifest.rejects.set_index("path").loc[path, "reason"]


def test_an_image_without_its_identifier_is_not_given_the_finding_of_a_blank_label_row(tmp_path):
    sites = tmp_path / "sites"
    write_dicom(sites / "a" / "1.dcm", "p1", "A1")
    write_dicom(sites / "a" / "2.dcm", "p2", "")  # no accession number in the header
    (sites / "a" / "labels.csv").write_text("accession_number,finding\nA1,normal\n,pneumonia\n")
    manifest = build_sites_pool(sites, tmp_path / "pool", workers=1, verbose=False)
    assert list(manifest.rows["path"]) == ["a/1.dcm"]
    assert reason_of(manifest, "a/2.dcm").startswith("no label row in labels.csv")
    assert reason_of(manifest, "a/labels.csv:3").startswith("label row matches no image")  # counted, not swallowed


def test_a_labels_csv_that_is_not_utf8_rejects_its_site_and_the_run_goes_on(tmp_path):
    sites = tmp_path / "sites"
    write_dicom(sites / "a" / "1.dcm", "p1", "A1")
    (sites / "a" / "labels.csv").write_text("accession_number,finding\nA1,normal\n")
    write_dicom(sites / "b" / "1.dcm", "p2", "B1")
    (sites / "b" / "labels.csv").write_bytes("accession_number,finding,comment\nB1,normal,Réf. ext\n".encode("latin-1"))
    manifest = build_sites_pool(sites, tmp_path / "pool", workers=1, verbose=False)
    assert list(manifest.rows["path"]) == ["a/1.dcm"]
    assert "is not UTF-8 text" in reason_of(manifest, "b/1.dcm") and "CSV UTF-8" in reason_of(manifest, "b/1.dcm")


def tiny_pool(pool_dir: Path):
    writer = PoolWriter(pool_dir, ["normal", "pneumonia"])
    for i in range(3):
        uid = f"u{i}"
        writer.add(np.full((1, 4, 4), i / 4, np.float32), site="a", patient_id=uid, study_uid=uid, series_uid=uid, sop_uid=uid,
                   path=f"a/{i}.dcm", label=i % 2, split="train")  # fmt: skip
    return writer.close()


def edit_manifest(pool_dir: Path, edit) -> None:
    with open(pool_dir / MANIFEST_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    edit(rows)
    with open(pool_dir / MANIFEST_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def set_cell(column: str, value: str, row: int = 1):
    return lambda rows: rows[row].update({column: value})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda rows: [r.pop("label") for r in rows], "lacks columns ['label']"),
        (set_cell("label", "pneumonia"), "label not an integer 0..1: 'pneumonia' on line 3"),
        (set_cell("label", "2"), "label not an integer 0..1: 2 on line 3"),
        (set_cell("label", ""), "label not an integer"),
        (set_cell("split", "holdout"), "split not one of train, val, test: 'holdout' on line 3"),
        (set_cell("offset", "-16"), "offset not an integer >= 0"),
        (set_cell("offset", "40", row=2), "pixels ending past the 48 values stored in pixels.f32: 56 on line 4"),
        (set_cell("height", "4.5"), "height not an integer >= 1"),
    ],
)
def test_a_damaged_manifest_is_refused_with_the_line_at_fault(tmp_path, edit, message):
    tiny_pool(tmp_path)
    edit_manifest(tmp_path, edit)
    with pytest.raises(InputError, match="build it again") as err:
        load_manifest(tmp_path)
    assert message in str(err.value) and MANIFEST_FILE in str(err.value)


@pytest.mark.parametrize(
    ("row", "column", "value"),
    [
        (2, "offset", str(2**64 - 48)),  # read as an int64 it wraps to -48: row 0's pixels
        (1, "offset", "0"),  # row 0's pixels again
        (2, "offset", "20"),  # half of row 1's
        (1, "height", str(2**32)),  # 1 * 2**32 * 2**32 values: 0 once the product wraps
    ],
)
def test_an_offset_or_side_that_points_at_another_images_pixels_is_refused(tmp_path, row, column, value):
    tiny_pool(tmp_path)
    edit_manifest(tmp_path, set_cell(column, value, row=row))
    if column == "height":
        edit_manifest(tmp_path, set_cell("width", str(2**32), row=row))
    with pytest.raises(InputError, match="build it again") as err:
        load_manifest(tmp_path)
    assert f"line {row + 2}" in str(err.value) and MANIFEST_FILE in str(err.value)


def test_a_manifest_header_naming_a_column_twice_is_refused(tmp_path):
    """A second 'label' column (pasted in by hand) was read as 'label.1' and ignored: the first one silently won."""
    tiny_pool(tmp_path)
    text = (tmp_path / MANIFEST_FILE).read_text().splitlines()
    (tmp_path / MANIFEST_FILE).write_text("\n".join([text[0] + ",label", *(line + ",1" for line in text[1:])]) + "\n")
    with pytest.raises(InputError, match=r"names columns \['label'\] twice") as err:
        load_manifest(tmp_path)
    assert err.value.where == str(tmp_path / MANIFEST_FILE)


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: b"",  # cut short to nothing
        lambda text: text.replace(b"a/1.dcm", b'"a/1.dcm'),  # a quote left open
        lambda text: b"\xff\xfe" + text,  # saved as UTF-16 by an editor
    ],
)
@pytest.mark.parametrize("file", [MANIFEST_FILE, "rejects.csv"])
def test_a_pool_csv_that_cannot_be_parsed_is_refused_as_damaged_naming_it(tmp_path, damage, file):
    tiny_pool(tmp_path)
    intact = (tmp_path / MANIFEST_FILE).read_bytes() if file == MANIFEST_FILE else b"site,path,reason\na,a/1.dcm,unreadable\n"
    (tmp_path / file).write_bytes(damage(intact))
    with pytest.raises(InputError, match="not a readable CSV file") as err:
        load_manifest(tmp_path)
    assert err.value.where == str(tmp_path / file) and "build it again" in err.value.hint


def test_a_rejects_table_without_its_columns_is_refused_as_damaged_naming_them(tmp_path):
    tiny_pool(tmp_path)
    (tmp_path / "rejects.csv").write_text("site,path,why\na,a/1.dcm,unreadable\n")  # a column renamed by hand
    with pytest.raises(InputError, match=r"lacks its column\(s\) \['reason'\]") as err:
        load_manifest(tmp_path).summary()
    assert err.value.where == str(tmp_path / "rejects.csv") and "build it again" in err.value.hint


def test_a_cut_short_pixel_cache_or_missing_label_names_are_refused(tmp_path):
    tiny_pool(tmp_path)
    with open(tmp_path / PIXELS_FILE, "r+b") as f:
        f.truncate(40 * 4)
    with pytest.raises(InputError, match="past the 40 values"):
        load_manifest(tmp_path)
    (tmp_path / LABELS_FILE).write_text('{"0": "normal"}')
    with pytest.raises(InputError, match=f"{LABELS_FILE}: label names must be"):
        load_manifest(tmp_path)
    (tmp_path / LABELS_FILE).unlink()
    with pytest.raises(InputError, match="label names unreadable"):
        load_manifest(tmp_path)


def test_an_intact_manifest_reads_back_unchanged(tmp_path):
    written = tiny_pool(tmp_path)
    assert list(written.rows["label"]) == [0, 1, 0] and written.rows["offset"].tolist() == [0, 16, 32]
    assert written.image(2)[0, 0, 0] == 0.5


def sites_pool(tmp_path: Path):
    sites = tmp_path / "sites"
    write_dicom(sites / "a" / "1.dcm", "p1", "A1")
    (sites / "a" / "labels.csv").write_text("accession_number,finding\nA1,normal\n")
    return build_sites_pool(sites, tmp_path / "pool", val_fraction=0.0, test_fraction=0.0, workers=1, verbose=False)


@pytest.mark.parametrize("path", ["../../outside.dcm", "/etc/passwd", "a/../../outside.dcm"])
def test_picked_files_never_lie_outside_the_site_folders(tmp_path, path):
    pool_dir = sites_pool(tmp_path).pool_dir
    assert split_files(pool_dir, "train") == [tmp_path / "sites" / "a" / "1.dcm"]
    edit_manifest(pool_dir, set_cell("path", path, row=0))
    with pytest.raises(InputError, match="does not lie inside the site folders"):
        split_files(pool_dir, "train")


def test_picking_files_from_a_pool_not_built_from_sites_says_so(tmp_path):
    pool_dir = sites_pool(tmp_path).pool_dir
    (pool_dir / INPUTS_FILE).write_text(json.dumps(["not", "a", "record"]))
    with pytest.raises(DataNotFoundError, match="built from site folders"):
        split_files(pool_dir, "train")
    (pool_dir / INPUTS_FILE).unlink()
    with pytest.raises(DataNotFoundError, match="built from site folders"):
        split_files(pool_dir, "train")


def test_a_pool_reused_from_moved_site_folders_picks_files_where_they_now_lie(tmp_path):
    sites_pool(tmp_path)
    (tmp_path / "sites").rename(tmp_path / "moved")  # names, sizes and times kept: the pool is reused
    build_sites_pool(tmp_path / "moved", tmp_path / "pool", val_fraction=0.0, test_fraction=0.0, workers=1, verbose=False)
    assert split_files(tmp_path / "pool", "train") == [tmp_path / "moved" / "a" / "1.dcm"]


def test_images_without_a_sop_instance_uid_are_rejected_as_such_not_as_each_others_duplicates(tmp_path):
    sites = tmp_path / "sites"
    for n in (1, 2):
        write_dicom(sites / "a" / f"{n}.dcm", f"p{n}", f"A{n}")
        ds = pydicom.dcmread(sites / "a" / f"{n}.dcm")
        del ds.SOPInstanceUID
        ds.save_as(sites / "a" / f"{n}.dcm")
    (sites / "a" / "labels.csv").write_text("accession_number,finding\nA1,normal\nA2,pneumonia\n")
    with pytest.raises(DataNotFoundError):  # nothing left to pool
        build_sites_pool(sites, tmp_path / "pool", workers=1, verbose=False)
    rejects = list(csv.DictReader((tmp_path / "pool" / "rejects.csv").open()))
    assert [r["path"] for r in rejects] == ["a/1.dcm", "a/2.dcm"]
    assert all(r["reason"].startswith("no SOP Instance UID (0008,0018) in the header") for r in rejects)
