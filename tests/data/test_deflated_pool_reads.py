"""The pool builder on deflated files: an image is pooled as the same file uncompressed is (pixels, label, identifiers),
a deflated file past the decode limits is rejected as before, and the header of a file whose pixels failed is read
as it inflates, up to its pixel data only (pydicom inflated the whole data set to read it)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from medtriage.data.pool import _header_ids, build_sites_pool
from tests.io.test_deflate_bombs import deflate_bomb
from tests.io.test_deflated_ingest_reads import deflated_image
from tests.memory import peak_bytes

MiB = 1 << 20
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def _image(syntax: str, patient: str, accession: str) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CR_STORAGE, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.AccessionNumber, ds.Modality, ds.BodyPartExamined = patient, accession, "CR", "CHEST"
    ds.Rows, ds.Columns = 48, 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = (np.arange(48 * 64, dtype=np.uint16) * 7 % 4096).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CR_STORAGE, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _build(tmp_path: Path, name: str, files: dict[str, bytes], labels: str):
    site = tmp_path / name / "a"
    site.mkdir(parents=True)
    for file, data in files.items():
        (site / file).write_bytes(data)
    (site / "labels.csv").write_text("accession_number,finding\n" + labels)
    return build_sites_pool(site.parent, tmp_path / f"pool-{name}", val_fraction=0.0, test_fraction=0.0, workers=1, verbose=False)


def test_a_deflated_image_is_pooled_as_the_same_image_uncompressed(tmp_path):
    labels = "A1,normal\nA2,pneumonia\n"
    pools = {}
    for name, syntax in (("deflated", DeflatedExplicitVRLittleEndian), ("plain", ExplicitVRLittleEndian)):
        files = {"1.dcm": _image(syntax, "p1", "A1"), "2.dcm": _image(syntax, "p2", "A2")}
        pools[name] = _build(tmp_path, name, files, labels)
    deflated, plain = pools["deflated"], pools["plain"]
    assert len(deflated.rejects) == len(plain.rejects) == 0
    columns = ["path", "label", "patient_id", "modality", "rows", "columns", "split"]
    assert deflated.rows[columns].to_dict("records") == plain.rows[columns].to_dict("records")
    assert list(deflated.rows["label"]) == [0, 1]
    np.testing.assert_array_equal(deflated.pixels(), plain.pixels())
    assert deflated.pixels().std() > 0


def _reasons(manifest) -> dict[str, str]:
    return dict(zip(manifest.rejects["path"], manifest.rejects["reason"]))


def test_a_deflated_file_past_the_decode_limits_is_rejected_as_before_and_named_by_its_header(tmp_path, small_decode_limits):
    """Rejected with the reason the decode gives, as before. Where its header lies within the limits (the bulk is its
    pixels), the header read for its identifiers now inflates no further than the pixels, so it names the image and its
    label row is not reported a second time, as for an uncompressed image too large to decode (the header read used to
    count the whole data set first, and gave up). A header that itself inflates past the limits (a bulk element before
    the pixels) is still not read."""
    files = {
        "good.dcm": _image(DeflatedExplicitVRLittleEndian, "p1", "A1"),
        "pixels.dcm": deflated_image(8192, 8192, accession="A2"),  # 128 MiB of pixels
        "header.dcm": deflate_bomb(64 * MiB),  # 64 MiB of a private element before its pixels
    }
    manifest = _build(tmp_path, "bombs", files, "A1,normal\nA2,pneumonia\n")
    refusal = f"the deflated data set inflates to more than {small_decode_limits} bytes"
    assert list(manifest.rows["path"]) == ["a/good.dcm"]
    assert _reasons(manifest) == {"a/pixels.dcm": refusal, "a/header.dcm": refusal}


def test_a_deflated_file_whose_header_inflates_past_the_limits_is_not_identified(tmp_path, small_decode_limits):
    bomb = deflate_bomb(64 * MiB, bulk_group=0x0009)  # the bulk among the identifying elements, before the accession
    path = tmp_path / "bomb.dcm"
    path.write_bytes(bomb)
    assert _header_ids(path) == {}


def test_the_header_of_a_failed_deflated_file_is_inflated_up_to_its_pixels_only(tmp_path):
    """Within the decode limits (the default ones), pydicom inflated its 128 MiB of pixels to read the header before."""
    path = tmp_path / "image.dcm"
    path.write_bytes(deflated_image(8192, 8192))
    found = []
    assert peak_bytes(lambda: found.append(_header_ids(path))) < 4 * MiB
    assert found == [{"sop_uid": "1.2.826.0.1.3680043.8.498.1", "accession_number": "A1"}]
