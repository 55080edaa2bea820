"""Sizes a header claims are bounded before anything is decoded: a typed ImageTooLargeError."""

import io

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medtriage.errors import DicomError, ImageTooLargeError
from medtriage.io.decode_limits import DecodeLimits, default_limits, set_default_limits
from medtriage.io.dicom import read_dicom


def _with(name: str, **attributes) -> bytes:
    ds = pydicom.dcmread(get_testdata_file(name))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def test_a_small_compressed_file_claiming_a_huge_frame_is_refused_before_decoding():
    data = _with("JPEG2000.dcm", Rows=60000, Columns=60000)
    assert len(data) < 200_000
    with pytest.raises(ImageTooLargeError, match="pixels per frame"):
        read_dicom(data)


def test_too_many_frames_and_too_many_decoded_bytes_are_refused():
    with pytest.raises(ImageTooLargeError, match="frames exceed"):
        read_dicom(_with("emri_small.dcm", NumberOfFrames=100_000))
    with pytest.raises(ImageTooLargeError, match="bytes of pixels"):
        read_dicom(get_testdata_file("emri_small.dcm"), limits=DecodeLimits(max_decoded_bytes=64 * 64 * 4 * 5))
    assert read_dicom(get_testdata_file("emri_small.dcm"), frame=0, limits=DecodeLimits(max_decoded_bytes=64 * 64 * 4)).frames == 1


def test_limits_are_configurable_per_call_and_per_process():
    small = DecodeLimits(max_frame_pixels=100)
    with pytest.raises(ImageTooLargeError):
        read_dicom(get_testdata_file("CT_small.dcm"), limits=small)
    previous = default_limits()
    set_default_limits(small)
    try:
        with pytest.raises(ImageTooLargeError):
            read_dicom(get_testdata_file("CT_small.dcm"))
    finally:
        set_default_limits(previous)
    assert read_dicom(get_testdata_file("CT_small.dcm")).pixels.shape == (1, 1, 128, 128)


def test_a_codestream_larger_than_its_header_is_refused():
    data = _with("JPEG2000.dcm", Rows=16, Columns=16)  # the JPEG 2000 frame itself says 1024 x 256
    with pytest.raises(DicomError, match="compressed frame declares"):
        read_dicom(data)


def test_nonsense_sizes_are_typed_errors():
    for attributes in ({"Rows": 0}, {"NumberOfFrames": -3}):
        with pytest.raises(DicomError):
            read_dicom(_with("CT_small.dcm", **attributes))
    assert np.isfinite(read_dicom(get_testdata_file("CT_small.dcm")).pixels).all()
