"""What the pool builders make of inputs they cannot use as they are: a site's labels.csv (a byte order mark,
repeated or conflicting rows, blank lines, huge cells, bytes that are not UTF-8, findings outside the label names) and
a MedMNIST npz (counts, dtypes or shapes that do not fit). Each says what is wrong and where, and leaves no half pool."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medtriage.data.manifest import MANIFEST_FILE, PoolWriter, load_manifest
from medtriage.data.pool import build_sites_pool
from medtriage.data.sources.medmnist import build_npz_pool
from medtriage.errors import DataNotFoundError, InputError
from tests.data.test_npz_pool_source import LABELS
from tests.data.test_pool_and_manifest_edges import write_dicom
from tests.data.test_pool_writer import add

HEADER = b"accession_number,finding\n"


@pytest.fixture(scope="module")
def two_images(tmp_path_factory) -> tuple[bytes, bytes]:
    folder = tmp_path_factory.mktemp("dicom")
    write_dicom(folder / "1.dcm", "p1", "A1")
    write_dicom(folder / "2.dcm", "p2", "A2")
    return (folder / "1.dcm").read_bytes(), (folder / "2.dcm").read_bytes()


def build_with_labels(tmp_path: Path, two_images, labels: bytes):
    """A site of two images (accession numbers A1 and A2) and `labels` as its labels.csv."""
    site = tmp_path / "sites" / "a"
    site.mkdir(parents=True)
    for i, data in enumerate(two_images, start=1):
        (site / f"{i}.dcm").write_bytes(data)
    (site / "labels.csv").write_bytes(labels)
    return build_sites_pool(tmp_path / "sites", tmp_path / "pool", val_fraction=0.0, test_fraction=0.0, workers=1, verbose=False)


def reasons(manifest) -> dict[str, str]:
    return dict(zip(manifest.rejects["path"], manifest.rejects["reason"]))


@pytest.mark.parametrize(
    "labels",
    [
        b"\xef\xbb\xbf" + HEADER + b"A1,normal\nA2,pneumonia\n",  # Excel's 'CSV UTF-8'
        b"\xef\xbb\xbfAccession Number , Finding\r\nA1,Normal\r\nA2, PNEUMONIA \r\n",
        HEADER + b"A1,normal\nA1,normal\nA2,pneumonia\n",  # the same row twice: one label
        HEADER + b"\nA1,normal\n\n , \n,,\n   \nA2,pneumonia\n\n",  # blank lines, and rows of blank cells
    ],
    ids=["bom", "bom_and_spelling", "repeated_row", "blank_lines"],
)
def test_labels_that_say_one_thing_per_image_build_every_image(tmp_path, two_images, labels):
    manifest = build_with_labels(tmp_path, two_images, labels)
    assert list(manifest.rows["label"]) == [0, 1] and len(manifest.rejects) == 0


def test_conflicting_findings_reject_their_image_naming_the_lines(tmp_path, two_images):
    manifest = build_with_labels(tmp_path, two_images, HEADER + b"A1,normal\nA2,pneumonia\nA1,pneumonia\n")
    assert list(manifest.rows["path"]) == ["a/2.dcm"]
    assert reasons(manifest) == {"a/1.dcm": "conflicting findings in labels.csv (['normal', 'pneumonia'] on lines 2, 4)"}


def test_line_numbers_count_the_lines_of_a_cell_that_spans_several(tmp_path, two_images):
    labels = b'accession_number,finding,comment\nA1,normal,"seen twice;\nsee notes"\nA2,maybe,\n'
    assert reasons(build_with_labels(tmp_path, two_images, labels))["a/2.dcm"] == (
        "unknown finding in labels.csv ('maybe' on line 4; expected normal or pneumonia)"
    )


def test_a_huge_or_unprintable_cell_is_quoted_short_and_on_one_line(tmp_path, two_images):
    labels = HEADER + b"A1," + b"x" * 100_000 + b'\nA2,pneumonia\n"Z\x1b[2J\nZ",normal\n'
    found = reasons(build_with_labels(tmp_path, two_images, labels))
    assert all(len(reason) < 200 and reason.isprintable() for reason in found.values()), found
    assert found["a/1.dcm"].startswith("unknown finding in labels.csv ('xxxx") and "...' on line 2" in found["a/1.dcm"]
    assert found["a/labels.csv:4"] == "label row matches no image (accession_number Z\\x1b[2J\\nZ)"


def test_a_cell_past_what_csv_reads_names_its_line(tmp_path, two_images):
    labels = HEADER + b"A1,normal\nA2," + b"y" * 200_000 + b"\n"
    with pytest.raises(DataNotFoundError, match="no image"):
        build_with_labels(tmp_path, two_images, labels)
    reason = (tmp_path / "pool" / "rejects.csv").read_text().splitlines()[1]
    assert "labels.csv cannot be read as CSV (line 3: field larger than field limit" in reason and "identifier and finding" in reason
    with pytest.raises(DataNotFoundError, match="no pooled manifest"):
        load_manifest(tmp_path / "pool")


def test_labels_csv_that_is_not_utf8_names_the_byte(tmp_path, two_images):
    labels = HEADER + "A1,normal\nA2,pneumonia,réf\n".encode("latin-1")
    with pytest.raises(DataNotFoundError, match="no image"):
        build_with_labels(tmp_path, two_images, labels)
    reason = (tmp_path / "pool" / "rejects.csv").read_text().splitlines()[1]
    at = labels.index("é".encode("latin-1"))
    assert f"labels.csv is not UTF-8 text (byte {at}: invalid continuation byte" in reason
    assert "CSV UTF-8" in reason


def write_npz(path: Path, **changes) -> Path:
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = np.zeros((4, 8, 8), np.uint8)
        arrays[f"{split}_labels"] = np.array([[0], [1], [0], [1]])
    np.savez(path, **{**arrays, **changes})
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"val_labels": np.array([0, 1, 0])}, "'val_labels' is int64 [3], not one integer label for each of the 4 images"),
        ({"train_images": np.zeros((4, 8, 8), np.float32)}, "'train_images' is float32 [4, 8, 8], not uint8"),
        ({"train_labels": np.array([0.0, 1, 0, 1])}, "'train_labels' is float64 [4]"),
        ({"test_images": np.zeros((4, 8, 8, 4), np.uint8)}, "'test_images' is uint8 [4, 8, 8, 4]"),
        ({"train_labels": np.array([0, 1, 0, 2])}, "'train_labels' holds label 2"),
        ({"train_images": np.zeros((4, 0, 8), np.uint8)}, "'train_images' holds images of 0 x 8 pixels"),
        ({"val_images": np.zeros((4, 8, 0, 3), np.uint8)}, "'val_images' holds images of 8 x 0 pixels"),
    ],
    ids=["count", "float_images", "float_labels", "four_channels", "label_past_the_names", "no_rows", "no_columns"],
)
def test_an_npz_that_does_not_fit_is_refused_naming_it_and_writes_no_pool(tmp_path, changes, message):
    npz = write_npz(tmp_path / "set.npz", **changes)
    with pytest.raises(InputError) as err:
        build_npz_pool(npz, tmp_path / "pool", LABELS)
    assert message in str(err.value) and err.value.where == str(npz) and err.value.hint
    assert not (tmp_path / "pool" / MANIFEST_FILE).exists()


def test_a_writer_refuses_an_image_without_pixels_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"\(1, 0, 8\)"), PoolWriter(tmp_path / "pool", LABELS) as writer:
        add(writer, 0.25)
        writer.add(np.zeros((1, 0, 8), np.float32), site="a", path="a/empty", label=0, split="train")
    assert [p.name for p in (tmp_path / "pool").iterdir() if not p.name.startswith(".pool")] == []


def emri_with_frame_count(path: Path, sop_uid: str, count: bytes) -> None:
    """pydicom's 10-frame JPEG 2000 sample, of patient p1, with Number of Frames written as `count`, byte for byte."""
    ds = pydicom.dcmread(get_testdata_file("emri_small_jpeg_2k_lossless.dcm"))
    ds.PatientID, ds.SOPInstanceUID, ds.NumberOfFrames = "p1", sop_uid, "7777777"
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path.write_bytes(buffer.getvalue().replace(b"7777777 ", count.ljust(8)))


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom")  # pydicom's note on 2.5; the reject says it
@pytest.mark.parametrize(
    ("count", "reason"),
    [
        (b"0", "image claims 64 x 64 pixels, 0 frame(s), 1 sample(s) per pixel"),
        (b"2.5", "malformed image size attributes (Number of Frames 2.5 is not a whole number)"),
    ],
)
def test_a_file_whose_number_of_frames_counts_no_frame_or_a_fraction_is_rejected_saying_so(tmp_path, count, reason):
    """Before, Number of Frames 0 was read as 1 and 2.5 as 2: the file was pooled from its first frame."""
    site = tmp_path / "sites" / "a"
    site.mkdir(parents=True)
    emri_with_frame_count(site / "whole.dcm", "1.2.3.1", b"10")
    emri_with_frame_count(site / "odd.dcm", "1.2.3.2", count)
    (site / "labels.csv").write_text("sop_instance_uid,finding\n1.2.3.1,normal\n1.2.3.2,pneumonia\n")
    manifest = build_sites_pool(tmp_path / "sites", tmp_path / "pool", val_fraction=0.0, test_fraction=0.0, workers=1, verbose=False)
    assert list(manifest.rows["path"]) == ["a/whole.dcm"] and reasons(manifest) == {"a/odd.dcm": reason}
