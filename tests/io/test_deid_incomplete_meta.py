"""Files that lack what a de-identified file's meta is made of, from pydicom's own test files: a file meta without a
Transfer Syntax UID is written in the syntax pydicom read the data set in (quarantined where compressed pixel data
leaves it unknown), and an object without a SOP Class UID is quarantined saying so."""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from medtriage.errors import InputError
from medtriage.io.deid import NO_SOP_CLASS, NO_SOP_INSTANCE, NO_TRANSFER_SYNTAX, DeidOptions, deidentify, not_deidentifiable
from medtriage.io.ingest_file import init_worker, process_file
from medtriage.io.part10 import encode
from medtriage.io.quarantine import Unsafe, screen
from medtriage.io.site_key import SiteKey

KEY = SiteKey(b"test-site-secret-0123456789abcdef")
# pydicom's test files whose data set has no SOP Class UID
NO_CLASS_FILES = [
    "meta_missing_tsyntax.dcm",
    "no_meta_group_length.dcm",
    "priv_SQ.dcm",
    "nested_priv_SQ.dcm",
    "UN_sequence.dcm",
    "empty_charset_LEI.dcm",
    "DICOMDIR-empty.dcm",
]


def _ingested(tmp_path, data: bytes):
    init_worker(KEY, DeidOptions(), frozenset(), False)
    path = tmp_path / "image.dcm"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's notes on the missing meta element
        return process_file(str(path))


def _without_transfer_syntax(name: str) -> bytes:
    """pydicom's test file `name`, given a patient, with the Transfer Syntax UID cut out of its file meta."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.PatientID = "patient-1"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data, syntax = buffer.getvalue(), ds.file_meta.TransferSyntaxUID
    value = (syntax + "\0" * (len(syntax) % 2)).encode()
    element = b"\x02\x00\x10\x00UI" + struct.pack("<H", len(value)) + value
    assert data.count(element) == 1
    data = data.replace(element, b"")
    group_length = struct.unpack("<I", data[140:144])[0] - len(element)  # (0002,0000) UL, first after DICM
    return data[:140] + struct.pack("<I", group_length) + data[144:]


def test_a_file_meta_without_transfer_syntax_is_rebuilt_with_the_syntax_the_data_set_was_read_in():
    """Before, rebuilding the file meta raised AttributeError on the missing Transfer Syntax UID."""
    ds = pydicom.dcmread(get_testdata_file("meta_missing_tsyntax.dcm"))  # implicit VR, pixel data only
    pixels = ds.PixelData
    ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID = "1.2.840.10008.5.1.4.1.1.7", generate_uid(), "patient-1"
    deidentify(ds, KEY)
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    back = pydicom.dcmread(io.BytesIO(encode(ds)))
    assert back.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian and back.PixelData == pixels


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm"])
def test_ingest_pools_a_native_image_whose_file_meta_lacks_a_transfer_syntax(tmp_path, name):
    """Before, the pixel check met the missing Transfer Syntax UID and quarantined the image as undecodable."""
    original = pydicom.dcmread(get_testdata_file(name))
    outcome = _ingested(tmp_path, _without_transfer_syntax(name))
    assert outcome.status == "pending", outcome
    pooled = pydicom.dcmread(io.BytesIO(outcome.encoded))
    assert pooled.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert np.array_equal(pooled.pixel_array, original.pixel_array)


def test_ingest_quarantines_compressed_pixels_whose_transfer_syntax_is_missing(tmp_path):
    outcome = _ingested(tmp_path, _without_transfer_syntax("emri_small_jpeg_2k_lossless.dcm"))
    assert (outcome.status, outcome.reason, outcome.detail) == ("quarantined", "unreadable", NO_TRANSFER_SYNTAX)


@pytest.mark.parametrize("name", NO_CLASS_FILES)
def test_an_object_without_sop_class_uid_is_refused_saying_what_is_missing(tmp_path, name):
    """Before, de-identification raised a bare AttributeError, and ingest said only that the instance UID was missing."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.PatientID = "patient-1"  # else refused for naming no patient first
    with pytest.raises(InputError, match=r"no SOP Class UID \(0008,0016\)"):
        deidentify(ds, KEY)
    outcome = _ingested(tmp_path, Path(get_testdata_file(name)).read_bytes())
    assert (outcome.status, outcome.reason, outcome.detail) == ("quarantined", "unreadable", NO_SOP_CLASS)


def test_ingest_quarantines_an_image_without_sop_class_uid_saying_what_is_missing(tmp_path):
    """An image with its instance UID and pixels, but no SOP Class UID: before, quarantined with AttributeError text."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.SOPClassUID
    buffer = io.BytesIO()
    ds.save_as(buffer)
    outcome = _ingested(tmp_path, buffer.getvalue())
    assert (outcome.status, outcome.reason, outcome.detail) == ("quarantined", "unreadable", NO_SOP_CLASS)


@pytest.mark.parametrize("uid", [None, ""])
def test_the_screen_words_a_missing_sop_instance_uid_as_de_identification_does(uid):
    """Before, the screen said a bare "no SOP Instance UID" (and let an empty one through): no tag, nothing to do."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    if uid is None:
        del ds.SOPInstanceUID
    else:
        ds.SOPInstanceUID = uid
    assert not_deidentifiable(ds) == NO_SOP_INSTANCE
    assert screen(ds) == Unsafe("unreadable", NO_SOP_INSTANCE)
