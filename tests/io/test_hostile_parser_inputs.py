"""Damaged and hostile copies of real files against the parsers that read untrusted bytes before anything is decoded:
the size check must look at the bytes a decoder will decode, the reduced JPEG 2000 path must hand what it cannot read
to the full decode, and the Part 10 encoder must write what it read, byte for byte."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

from medtriage.errors import DicomError
from medtriage.io.deid import deidentify
from medtriage.io.dicom import read_dicom
from medtriage.io.part10 import encode
from medtriage.io.site_key import SiteKey
from tests.io.test_dicom import sample_file

HUGE = 40_000  # 40000 x 40000 samples: gigabytes, if a decoder were let loose on it
KEY = SiteKey(b"test-site-secret-0123456789abcdef")


def _saved(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# ---------------------------------------------------------------- frames found by the Extended Offset Table


def _j2k_with_offset_table(target: int) -> pydicom.Dataset:
    """pydicom's JPEG 2000 sample (one frame, 1024 x 256) with a second fragment holding the same codestream whose SIZ
    claims HUGE x HUGE, and an Extended Offset Table pointing frame 1 at fragment `target` (0 or 1). In fragment order
    the frame is both fragments, starting with the honest SIZ."""
    ds = pydicom.dcmread(sample_file("JPEG2000.dcm"))
    (honest,) = generate_frames(ds.PixelData, number_of_frames=1)
    huge = honest[:8] + struct.pack(">II", HUGE, HUGE) + honest[16:]
    ds.PixelData = encapsulate([honest, huge], has_bot=False)
    ds["PixelData"].VR = "OB"
    offsets = [0, 8 + len(honest)]  # from the first fragment's item tag
    ds.ExtendedOffsetTable = struct.pack("<Q", offsets[target])
    ds.ExtendedOffsetTableLengths = struct.pack("<Q", len((honest, huge)[target]))
    return ds


def test_a_frame_the_extended_offset_table_points_at_is_checked_before_pydicom_decodes_it(decoder_calls):
    ds = _j2k_with_offset_table(target=1)
    # pydicom's decoders go by the table: this is the frame they would decode
    frame = pydicom.encaps.get_frame(ds.PixelData, 0, extended_offsets=(ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths))
    assert struct.unpack(">II", frame[8:16]) == (HUGE, HUGE)
    with pytest.raises(DicomError, match=rf"compressed frame declares {HUGE * HUGE} samples, the header {1024 * 256}"):
        read_dicom(_saved(ds))
    assert decoder_calls == []


def test_an_honest_extended_offset_table_still_decodes():
    image = read_dicom(_saved(_j2k_with_offset_table(target=0)))
    assert image.pixels.shape == (1, 1, 1024, 256)
    np.testing.assert_array_equal(image.pixels, read_dicom(sample_file("JPEG2000.dcm")).pixels)


# ---------------------------------------------------------------- a JPEG frame header without its height


def _jpeg_with_height_in_dnl(width: int, lines: int) -> bytes:
    """A 16 x 16 Pillow JPEG whose frame header (SOF) says height 0 and `width`, the height given by a DNL marker
    after the scan (ISO 10918-1 B.2.5): a decoder learns it only while decoding."""
    buffer = io.BytesIO()
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    sof = data.index(b"\xff\xc0")
    assert data.endswith(b"\xff\xd9")
    dnl = b"\xff\xdc" + struct.pack(">HH", 4, lines)
    return data[: sof + 5] + struct.pack(">HH", 0, width) + data[sof + 9 : -2] + dnl + b"\xff\xd9"


def test_a_decoder_takes_the_height_of_a_jpeg_from_its_dnl_marker():
    libjpeg = pytest.importorskip("libjpeg")  # the pylibjpeg plugin pydicom decodes baseline JPEG with
    assert libjpeg.decode(_jpeg_with_height_in_dnl(16, 16)).shape == (16, 16)


def test_a_jpeg_frame_header_that_leaves_its_height_to_a_dnl_marker_is_refused(decoder_calls):
    ds = pydicom.dcmread(sample_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([_jpeg_with_height_in_dnl(HUGE, HUGE)])
    ds["PixelData"].VR = "OB"
    with pytest.raises(DicomError, match=rf"frame 1 has a frame header \(SOF\) that declares 0 x {HUGE} pixels"):
        read_dicom(_saved(ds))
    assert decoder_calls == []


# ---------------------------------------------------------------- reduced JPEG 2000 decode, fewer frames than claimed


def test_a_jpeg2000_file_with_fewer_frames_than_its_header_reads_alike_with_and_without_min_side():
    ds = pydicom.dcmread(sample_file("CT_small.dcm"))
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 12, 11
    ds.compress(JPEG2000Lossless, np.arange(128 * 128, dtype=np.uint16).reshape(128, 128) % 4096)  # openjpeg's codestream
    assert read_dicom(_saved(ds), min_side=32).resolution_level == 2  # as made, it takes the reduced path
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    ds.NumberOfFrames = 2
    ds.PixelData = encapsulate([frame], has_bot=True)  # the offset table lists one frame
    data = _saved(ds)
    outcomes = []
    for min_side in (None, 32):
        try:
            outcomes.append(read_dicom(data, min_side=min_side).pixels.shape)
        except DicomError as err:
            outcomes.append(err.reason)
    assert outcomes[1] == outcomes[0]


# ---------------------------------------------------------------- Part 10 encoding of a VR byte outside ASCII


def test_an_element_whose_vr_bytes_are_not_ascii_is_written_as_read():
    raw = open(sample_file("CT_small.dcm"), "rb").read()
    modality = b"\x08\x00\x60\x00CS"
    assert raw.count(modality) == 1
    damaged = raw.replace(modality, b"\x08\x00\x60\x00C\xb2")  # one damaged VR byte (pydicom reads it as Latin-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs = pydicom.dcmread(io.BytesIO(damaged)), pydicom.dcmread(io.BytesIO(damaged))
        deidentify(ours, KEY)
        deidentify(theirs, KEY)
        written = encode(ours)
        assert written == _saved(theirs)
        again = pydicom.dcmread(io.BytesIO(written))
    assert again.Manufacturer == theirs.Manufacturer and again.Rows == theirs.Rows  # the elements after it line up
